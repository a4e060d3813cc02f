"""The real thing, once: tune Gemma 3 270M (from its packaged Q4_K_M GGUF) to increment Roman numerals, then
answer held-out numerals greedily with llama.cpp, with and without the exported adapter.gguf. The tuned model
must clearly beat the base, and give the same answers as the PEFT adapter in torch.

Slow (about three minutes on two cores, most of it the one-time GGUF -> Hugging Face conversion).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import llama_cpp
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from gemserve.models.catalog import DEFAULT_MODEL_ID
from gemserve.timestamps import utc_now
from gemserve.tuning import jobs
from gemserve.tuning.base_weights import prepare_base
from gemserve.tuning.dataset import ExampleEncoder, text_tokenizer
from gemserve.tuning.runner import run_job

pytestmark = pytest.mark.slow


def roman(n: int) -> str:
    digits = [(1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"), (50, "L"), (40, "XL"),
              (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]
    out = ""
    for value, letters in digits:
        while n >= value:
            out += letters
            n -= value
    return out


def split() -> tuple[list[dict[str, str]], list[tuple[str, str]]]:
    numbers = list(range(1, 56))
    random.Random(0).shuffle(numbers)
    pairs = [(roman(n), roman(n + 1)) for n in numbers]
    return [{"text_input": a, "output": b} for a, b in pairs[:40]], pairs[40:]


def llama_cpp_answers(model: Path, adapter: Path | None, prompts: list[list[int]]) -> list[str]:
    llm = llama_cpp.Llama(model_path=str(model), lora_path=str(adapter) if adapter else None, n_ctx=256,
                          n_threads=os.cpu_count() or 1, verbose=False)
    answers = []
    for prompt in prompts:
        out = llm.create_completion(prompt, max_tokens=8, temperature=0.0)
        answers.append(str(out["choices"][0]["text"]).strip())  # type: ignore[index]
    llm.close()
    return answers


def torch_answers(hf_dir: Path, adapter: Path, prompts: list[list[int]], end_id: int) -> list[str]:
    from transformers import AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32), adapter)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    answers = []
    with torch.inference_mode():
        for prompt in prompts:
            out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                 eos_token_id=end_id)
            answers.append(tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True).strip())
    return answers


def test_tuned_gemma_beats_the_base_on_held_out_numerals(data_dir: Path, default_gguf: Path) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    train, held_out = split()
    job = {
        "job_id": "roman", "created": utc_now(),
        "base_model": {"id": DEFAULT_MODEL_ID, "path": str(default_gguf)}, "source_adapter": None,
        "examples": train, "hyperparameters": {"epoch_count": 6, "batch_size": 4, "learning_rate": 1e-3},
        "lora": {"rank": 8, "alpha": 16}, "seed": 0,
    }
    directory = jobs.write_job(data_dir, job)
    started = time.perf_counter()
    assert run_job(data_dir, directory) == jobs.SUCCEEDED, jobs.read_progress(directory)["error"]
    seconds = time.perf_counter() - started
    progress = jobs.read_progress(directory)
    losses = [s["mean_loss"] for s in progress["snapshots"]]
    assert progress["completed_steps"] == 60
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 / 4

    base = prepare_base(data_dir, DEFAULT_MODEL_ID, default_gguf)  # converted by the job: instant now
    encoder = ExampleEncoder(base, text_tokenizer(base))
    prompts = [encoder.prompt_ids(numeral) for numeral, _ in held_out]
    expected = [answer for _, answer in held_out]
    paths = jobs.adapter_paths(directory)
    assert paths is not None and paths[1] is not None
    plain = llama_cpp_answers(default_gguf, None, prompts)
    tuned = llama_cpp_answers(default_gguf, paths[1], prompts)
    in_torch = torch_answers(base.hf_dir, paths[0], prompts, encoder.end_id)

    def accuracy(answers: list[str]) -> float:
        return sum(a == e for a, e in zip(answers, expected, strict=True)) / len(expected)

    print(f"\njob: {seconds:.0f} s (conversion included), loss {losses[0]:.2f} -> {losses[-1]:.3f}; held-out "
          f"accuracy: base {accuracy(plain):.0%}, tuned llama.cpp {accuracy(tuned):.0%}, tuned torch "
          f"{accuracy(in_torch):.0%}\n{list(zip(expected, plain, tuned, in_torch, strict=True))}")
    assert accuracy(tuned) >= accuracy(plain) + 0.5
    # llama.cpp runs the 4-bit base and torch its dequantized copy: the answers the adapter taught agree.
    same = sum(t == p for t, p in zip(tuned, in_torch, strict=True))
    assert same >= len(expected) - 1, list(zip(tuned, in_torch, strict=True))
