"""Tuning benchmark: LoRA training throughput and peak memory for models/gemma-3-270m, on a fixed small job.

The job: 40 "increment a Roman numeral" examples (I -> II, ..., XL -> XLI), batch size 4, learning rate 1e-3,
LoRA rank 8 / alpha 16 on every linear layer of the decoder, seed 0, `--epochs` epochs (10 steps an epoch).
It measures, in this process, with torch on `--threads` threads (default: all usable cores):

  - the one-time GGUF -> Hugging Face conversion, when `--data-dir` does not hold it yet (reported, not counted);
  - set-up: loading the HF weights and wrapping them with PEFT;
  - training: examples/s and tokens/s (real, unpadded tokens through the model, prompts included) over all
    steps after the first (the first pays one-time allocation; it is reported apart), seconds a step, and the
    loss of the first and last steps;
  - export: PEFT files + adapter.gguf;
  - peak RSS of this process (ru_maxrss), which is what a worker running this job needs.

Other processes on a shared machine slow it down: the report says how much CPU they took during the run.

    python benchmarks/tuning.py [--data-dir DIR] [--epochs 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from gemserve.models.catalog import DEFAULT_MODEL_ID, packaged_default_gguf  # noqa: E402
from gemserve.tuning.base_weights import MARKER_FILE, prepare_base  # noqa: E402
from gemserve.tuning.dataset import ExampleEncoder, text_tokenizer  # noqa: E402
from gemserve.tuning.export import export_adapter  # noqa: E402
from gemserve.tuning.jobs import Example  # noqa: E402
from gemserve.tuning.trainer import LoraSettings, LoraTrainer, TrainSettings  # noqa: E402


def roman(n: int) -> str:
    out = ""
    for value, letters in [(1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"), (50, "L"),
                           (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]:
        while n >= value:
            out += letters
            n -= value
    return out


def cpu_seconds_of_others() -> float:
    """CPU seconds all processes but this one have used since boot (from /proc/stat and this process's times)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    busy = sum(int(x) for i, x in enumerate(fields) if i not in (3, 4)) / os.sysconf("SC_CLK_TCK")
    mine = sum(os.times()[:4])
    return busy - mine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="reuse a data dir (and its converted weights)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="gemserve-bench-"))
    gguf_file = packaged_default_gguf(data_dir)

    others_before, wall_before = cpu_seconds_of_others(), time.perf_counter()
    converted = not (data_dir / "hf" / DEFAULT_MODEL_ID / MARKER_FILE).is_file()
    started = time.perf_counter()
    base = prepare_base(data_dir, DEFAULT_MODEL_ID, gguf_file)
    conversion = time.perf_counter() - started

    encoder = ExampleEncoder(base, text_tokenizer(base))
    examples = encoder.encode_all([Example(roman(n), roman(n + 1)) for n in range(1, 41)])
    settings = TrainSettings(epoch_count=args.epochs, batch_size=4, learning_rate=1e-3, seed=0,
                             lora=LoraSettings(rank=8, alpha=16))
    started = time.perf_counter()
    trainer = LoraTrainer(base.hf_dir, examples, settings, pad_id=encoder.end_id)
    setup = time.perf_counter() - started

    step_seconds: list[float] = []
    tokens_after_first = 0
    while not trainer.done:
        tokens_before = trainer.tokens_seen
        started = time.perf_counter()
        trainer.train_step()
        step_seconds.append(time.perf_counter() - started)
        if len(step_seconds) > 1:
            tokens_after_first += trainer.tokens_seen - tokens_before
    train_seconds = sum(step_seconds[1:])
    examples_after_first = (trainer.total_steps - 1) * settings.batch_size  # 40 is a multiple of 4: full batches

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as job_dir:
        export_adapter(trainer.model, base, Path(job_dir))
    export = time.perf_counter() - started
    wall = time.perf_counter() - wall_before
    others = (cpu_seconds_of_others() - others_before) / wall

    losses = [s.mean_loss for s in trainer.snapshots]
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    print(f"model: {DEFAULT_MODEL_ID} (Q4_K_M GGUF, trained in float32 on its dequantized weights), "
          f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} cores")
    print(f"job: {len(examples)} examples, batch 4, {args.epochs} epochs = {trainer.total_steps} steps, "
          f"LoRA rank 8 on all decoder linear layers ({trainable / 1e6:.2f} M trainable parameters), "
          f"{trainer.tokens_seen / trainer.total_steps / 4:.1f} tokens an example")
    if converted:
        print(f"one-time GGUF -> HF conversion: {conversion:.1f} s")
    print(f"set-up (load HF weights + PEFT): {setup:.1f} s")
    print(f"first step: {step_seconds[0]:.2f} s; later steps: median {statistics.median(step_seconds[1:]):.2f} s")
    print(f"throughput: {examples_after_first / train_seconds:.2f} examples/s, "
          f"{tokens_after_first / train_seconds:.0f} tokens/s")
    print(f"loss: {losses[0]:.2f} (step 1) -> {losses[-1]:.3f} (step {len(losses)})")
    print(f"export (PEFT + adapter.gguf): {export:.1f} s")
    print(f"peak RSS: {peak_rss_mib:.0f} MiB")
    print(f"other processes used {others:.2f} CPU cores on average during the run")


if __name__ == "__main__":
    main()
