"""LoRA training of a causal language model with PEFT, in float32 on the CPU, one optimizer step at a time.

The caller drives the loop (`train_step` until `done`), so that between steps it can report progress, write
checkpoints, and notice cancellation or shutdown. Everything a resumed run needs to continue exactly where it
stopped is in `state_dict()`: LoRA weights, AdamW state, RNG state, the data order of every epoch, the step and
the snapshots so far. The same seed and examples give the same adapter, whether or not the run was resumed.

Defaults: rank 8, alpha 16, dropout 0, LoRA on every linear layer of the decoder (not lm_head or embeddings),
AdamW. total_steps = epoch_count * ceil(n_examples / batch_size); each epoch visits the examples in its own
seeded random order, the last batch of an epoch taking what is left.

Not here: reading jobs and writing files (`runner.py`, `checkpoint.py`, `export.py`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from transformers import AutoModelForCausalLM, PreTrainedModel

from gemserve.timestamps import utc_now
from gemserve.tuning.dataset import IGNORE, Encoded, collate


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0


@dataclass(frozen=True)
class TrainSettings:
    epoch_count: int
    batch_size: int
    learning_rate: float
    seed: int
    lora: LoraSettings = LoraSettings()


@dataclass(frozen=True)
class Snapshot:
    step: int  # 1-based: the step that just finished
    epoch: int  # 1-based
    mean_loss: float  # mean cross-entropy over the output tokens of this step's batch
    compute_time: str  # RFC 3339 UTC, when the step finished

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def decoder_linear_names(model: PreTrainedModel) -> list[str]:
    """Leaf names of the decoder's linear layers (q_proj, ..., down_proj): every nn.Linear but the output head."""
    head = model.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and module is not head}
    return sorted(names)


class LoraTrainer:
    def __init__(self, model_dir: Path, examples: list[Encoded], settings: TrainSettings, *, pad_id: int,
                 source_adapter: Path | None = None) -> None:
        if not examples:
            raise ValueError("no examples to train on")
        self.settings = settings
        self._examples = examples
        self._pad_id = pad_id
        torch.manual_seed(settings.seed)  # LoRA's A matrices start random
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
        self.model: PeftModel
        if source_adapter is not None:
            # Tuning a tuned model: continue from its adapter, with that adapter's rank and targets.
            self.model = PeftModel.from_pretrained(base, source_adapter, is_trainable=True)
        else:
            config = LoraConfig(r=settings.lora.rank, lora_alpha=settings.lora.alpha,  # type: ignore[arg-type]
                                lora_dropout=settings.lora.dropout, target_modules=decoder_linear_names(base),
                                bias="none", task_type="CAUSAL_LM")
            self.model = get_peft_model(base, config)  # type: ignore[assignment]
        self.model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate)
        self.steps_per_epoch = math.ceil(len(examples) / settings.batch_size)
        self.total_steps = settings.epoch_count * self.steps_per_epoch
        generator = torch.Generator().manual_seed(settings.seed)
        self.order: list[list[int]] = [torch.randperm(len(examples), generator=generator).tolist()
                                       for _ in range(settings.epoch_count)]
        self.step = 0  # optimizer steps completed
        self.snapshots: list[Snapshot] = []
        self.tokens_seen = 0  # real (unpadded) tokens through the model, for throughput figures

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    @property
    def at_epoch_end(self) -> bool:
        return self.step > 0 and self.step % self.steps_per_epoch == 0

    def _batch_indices(self, step: int) -> list[int]:
        epoch, index = divmod(step, self.steps_per_epoch)
        size = self.settings.batch_size
        return self.order[epoch][index * size:(index + 1) * size]

    def loss(self, items: list[Encoded]) -> torch.Tensor:
        """Mean cross-entropy over the labelled (output) tokens of `items`."""
        batch = collate(items, self._pad_id)
        self.tokens_seen += batch.n_tokens
        targets = batch.labels[:, 1:]  # (batch, length - 1): position p predicts token p + 1
        # Only positions that predict a labelled token need logits. The output head is the largest matmul of a
        # small model (262k-token vocabulary for Gemma 3), so it runs on those positions alone.
        keep = (targets != IGNORE).any(dim=0).nonzero().squeeze(1)  # (kept,)
        out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep,
                         use_cache=False)
        logits = out.logits  # (batch, kept, vocab)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets[:, keep].reshape(-1),
                               ignore_index=IGNORE)

    def train_step(self) -> Snapshot:
        if self.done:
            raise RuntimeError("training is already complete")
        items = [self._examples[i] for i in self._batch_indices(self.step)]
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(items)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        snapshot = Snapshot(step=self.step, epoch=(self.step - 1) // self.steps_per_epoch + 1,
                            mean_loss=float(loss.detach()), compute_time=utc_now())
        self.snapshots.append(snapshot)
        return snapshot

    @torch.no_grad()
    def evaluate(self, items: list[Encoded]) -> float:
        """Mean loss over `items` without training (the model is left in training mode)."""
        self.model.eval()
        try:
            return float(self.loss(items))
        finally:
            self.model.train()

    def adapter_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "n_examples": len(self._examples),
            "seed": self.settings.seed,
            "order": self.order,
            "snapshots": [s.to_json() for s in self.snapshots],
            "adapter": self.adapter_weights(),
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),  # dropout draws from it
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = (self.total_steps, len(self._examples), self.settings.seed)
        found = (state["total_steps"], state["n_examples"], state["seed"])
        if found != expected:
            raise ValueError(f"the checkpoint is of another run (steps, examples, seed {found}, expected {expected})")
        result = set_peft_model_state_dict(self.model, state["adapter"])
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"the checkpoint's adapter does not fit the model: {unexpected[:3]}")
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.order = [list(epoch) for epoch in state["order"]]
        self.step = int(state["step"])
        self.snapshots = [Snapshot(**s) for s in state["snapshots"]]
