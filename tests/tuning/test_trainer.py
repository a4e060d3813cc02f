"""The LoRA trainer on a tiny Gemma 3: what it trains, what the loss counts, and exact resume from its state."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gemserve.tuning.base_weights import prepare_base
from gemserve.tuning.dataset import IGNORE, Encoded, ExampleEncoder, collate, text_tokenizer
from gemserve.tuning.jobs import Example
from gemserve.tuning.trainer import LoraSettings, LoraTrainer, TrainSettings
from tests.tuning import tiny


@pytest.fixture(scope="module")
def encoded(tiny_gemma: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Encoded], int]:
    base = prepare_base(tmp_path_factory.mktemp("data"), "tiny", tiny_gemma)
    encoder = ExampleEncoder(base, text_tokenizer(base))
    return encoder.encode_all([Example(**e) for e in tiny.MEMORY_TASK]), encoder.end_id


def make(tiny_gemma: Path, encoded: tuple[list[Encoded], int], epochs: int = 4, seed: int = 0) -> LoraTrainer:
    examples, end_id = encoded
    settings = TrainSettings(epoch_count=epochs, batch_size=4, learning_rate=1e-2, seed=seed,
                             lora=LoraSettings(rank=4, alpha=8))
    return LoraTrainer(tiny_gemma, examples, settings, pad_id=end_id)


def test_lora_targets_every_decoder_linear_layer_only(tiny_gemma: Path, encoded) -> None:
    trainer = make(tiny_gemma, encoded)
    adapted = {name.split(".lora_A")[0] for name, _ in trainer.model.named_parameters() if ".lora_A" in name}
    leaves = {name.rsplit(".", 1)[-1] for name in adapted}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(adapted) == 2 * 7  # two layers
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    # 6 examples, batch 4: two steps an epoch (4 + 2)
    assert (trainer.steps_per_epoch, trainer.total_steps) == (2, 8)


def test_loss_counts_output_tokens_only(tiny_gemma: Path, encoded) -> None:
    trainer = make(tiny_gemma, encoded)
    items = encoded[0][:3]
    batch = collate(items, pad_id=encoded[1])
    with torch.no_grad():
        logits = trainer.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1),
                                   ignore_index=IGNORE)
        assert float(trainer.loss(items)) == pytest.approx(float(expected), rel=1e-5)
        # Different prompts with the same outputs: the prompt tokens are not what is scored.
        unlabelled = [Encoded(item.input_ids, [IGNORE] * len(item.labels)) for item in items]
        assert torch.isnan(trainer.loss(unlabelled))


def test_training_memorizes_a_small_task(tiny_gemma: Path, encoded) -> None:
    trainer = make(tiny_gemma, encoded, epochs=30)
    before = trainer.evaluate(encoded[0])
    while not trainer.done:
        trainer.train_step()
    after = trainer.evaluate(encoded[0])
    assert after < before / 4, (before, after)
    assert [s.step for s in trainer.snapshots] == list(range(1, 61))
    assert [s.epoch for s in trainer.snapshots[:4]] == [1, 1, 2, 2]
    assert all(s.compute_time.endswith("Z") for s in trainer.snapshots)


def test_resume_from_state_gives_the_same_adapter(tiny_gemma: Path, encoded) -> None:
    straight = make(tiny_gemma, encoded, seed=3)
    while not straight.done:
        straight.train_step()

    first = make(tiny_gemma, encoded, seed=3)
    for _ in range(3):  # stops mid-epoch
        first.train_step()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    first.train_step()  # work after the checkpoint is lost with the process
    del first

    resumed = make(tiny_gemma, encoded, seed=3)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert resumed.step == 3 and len(resumed.snapshots) == 3
    while not resumed.done:
        resumed.train_step()
    assert resumed.step == straight.step == 8
    for key, value in straight.adapter_weights().items():
        torch.testing.assert_close(resumed.adapter_weights()[key], value, rtol=0, atol=1e-6)
    assert [s.mean_loss for s in resumed.snapshots] == pytest.approx([s.mean_loss for s in straight.snapshots])


def test_another_seed_gives_another_order_and_adapter(tiny_gemma: Path, encoded) -> None:
    a, b = make(tiny_gemma, encoded, seed=1), make(tiny_gemma, encoded, seed=2)
    assert a.order != b.order
    assert not torch.equal(next(iter(a.adapter_weights().values())), next(iter(b.adapter_weights().values())))


def test_state_of_another_run_is_refused(tiny_gemma: Path, encoded) -> None:
    state = make(tiny_gemma, encoded, seed=1).state_dict()
    with pytest.raises(ValueError, match="another run"):
        make(tiny_gemma, encoded, seed=2).load_state_dict(state)
