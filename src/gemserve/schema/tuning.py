"""The tunedModels vocabulary as clients send it: TunedModel, TuningTask, Dataset, Hyperparameters.

Output-only fields (name, state, times, snapshots) are accepted and ignored on input, as Google does; the
service decides what is mutable. Responses are built by the service as plain JSON.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from gemserve.schema.wire import OneOrMany, WireModel


class TuningExample(WireModel):
    text_input: str | None = None
    output: str | None = None


class TuningExamples(WireModel):
    examples: OneOrMany[TuningExample] = Field(default_factory=list)


class Dataset(WireModel):
    examples: TuningExamples | None = None


class Hyperparameters(WireModel):
    learning_rate: float | None = None
    learning_rate_multiplier: float | None = None
    epoch_count: int | None = None
    batch_size: int | None = None


class TuningSnapshotIn(WireModel):
    step: int | None = None
    epoch: int | None = None
    mean_loss: float | None = None
    compute_time: str | None = None


class TuningTask(WireModel):
    start_time: str | None = None
    complete_time: str | None = None
    snapshots: list[TuningSnapshotIn] | None = None
    training_data: Dataset | None = None
    hyperparameters: Hyperparameters | None = None


class TunedModelSource(WireModel):
    tuned_model: str | None = None
    base_model: str | None = None


class TunedModelIn(WireModel):
    """A TunedModel in a create or patch body."""

    name: str | None = None
    display_name: str | None = None
    description: str | None = None
    state: Any = None
    create_time: str | None = None
    update_time: str | None = None
    tuning_task: TuningTask | None = None
    tuned_model_source: TunedModelSource | None = None
    base_model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    reader_project_numbers: list[int] | None = None
