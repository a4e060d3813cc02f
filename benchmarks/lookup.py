"""Would prompt-lookup decoding pay on this machine? Sized before building it, in process, for one built-in model.

1. The cost of verifying k proposed tokens: one forward pass over k + 1 tokens of one sequence, logits at each,
   against a pass over one token (median ms of 30 passes, three rounds);
2. greedy answers of the model to a few prompts (its chat template, 128 tokens at most);
3. each answer replayed against n-gram lookup: at every step the last n tokens (n = 3, then 2) are looked up in
   the prompt and the answer so far, and the up to K tokens that followed their latest earlier occurrence are
   proposed; the ones the greedy answer agrees with are accepted, plus the token the pass itself gives. The
   figure is tokens / (sum over steps of the measured cost of that step's pass, in single-token passes): above
   1, lookup would have made that answer faster.

    python benchmarks/lookup.py [--model qwen2.5-coder-0.5b-instruct] [--data-dir ./data]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

MODELS = {"qwen2.5-coder-0.5b-instruct": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
          "gemma-3-270m": "gemma-3-270m-q4_k_m.gguf"}
PROMPTS = {
    "essay": "Write a long essay on the history of the printing press, from Gutenberg to the present day.",
    "code rewrite": "Here is a Python function:\n\ndef area(width, height):\n    return width * height\n\n"
                    "Rewrite it with type hints and a docstring.",
    "JSON from text": "Turn this into a JSON list of objects with name, role and city: Ada Lovelace, "
                      "mathematician, London; Alan Turing, computer scientist, Manchester; Grace Hopper, "
                      "programmer, New York.",
}
MAX_K = 8
NEW_TOKENS = 128


def verification_costs(model, prompt: list[int]) -> dict[int, float]:  # type: ignore[no-untyped-def]
    """ms of one pass over 1 + k tokens (logits at each), relative to one token."""
    model.decode([(0, 0, prompt, True)])
    rounds: dict[int, list[float]] = {k: [] for k in range(MAX_K + 1)}
    for _ in range(3):
        for k in rounds:
            position = len(prompt)
            started = time.perf_counter()
            for _ in range(30):
                model.decode([(0, position + j, [100 + j], True) for j in range(k + 1)])
                for j in range(k + 1):
                    np.argmax(model.logits(j))
                position += k + 1
            rounds[k].append((time.perf_counter() - started) / 30)
            model.forget(0, len(prompt))
    one = statistics.median(rounds[0])
    return {k: statistics.median(times) / one for k, times in rounds.items()}


def greedy_answer(model, prompt: list[int]) -> list[int]:  # type: ignore[no-untyped-def]
    model.forget(0)
    model.decode([(0, 0, prompt, True)])
    row, out = len(prompt) - 1, []
    for _ in range(NEW_TOKENS):
        token = int(np.argmax(model.logits(row)))
        if model.is_end_of_generation(token):
            break
        out.append(token)
        model.decode([(0, len(prompt) + len(out) - 1, [token], True)])
        row = 0
    return out


def proposal(tokens: list[int], k: int) -> list[int]:
    for n in (3, 2):
        if len(tokens) <= n:
            continue
        key = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == key:
                return tokens[start + n : start + n + k]
    return []


def replay(prompt: list[int], answer: list[int], k_max: int, costs: dict[int, float]) -> tuple[float, int, int]:
    """(speed-up, tokens proposed, tokens accepted) of lookup with up to `k_max` proposed tokens a pass."""
    tokens, i, cost, proposed, accepted = list(prompt), 0, 0.0, 0, 0
    while i < len(answer):
        guess = proposal(tokens, min(k_max, len(answer) - i - 1))
        agreed = 0
        while agreed < len(guess) and answer[i + agreed] == guess[agreed]:
            agreed += 1
        step = min(agreed + 1, len(answer) - i)
        tokens += answer[i : i + step]
        i += step
        cost += costs[len(guess)]
        proposed += len(guess)
        accepted += agreed
    return len(answer) / cost, proposed, accepted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    args = parser.parse_args()
    from gemserve.engine.backends.llamacpp_model import LlamaModel
    from gemserve.models.chat_format import ChatFormat, Message

    model = LlamaModel(args.data_dir / "models" / MODELS[args.model], context_size=4096, sequences=2, threads=None,
                       ubatch=512)
    meta = model.metadata
    chat = ChatFormat(meta.chat_template, meta.architecture, meta.bos_text, meta.eos_text)

    def tokens_of(text: str) -> list[int]:
        return chat.prompt_ids([Message("user", text)],
                               lambda piece, special: model.tokenize(piece, add_bos=False, parse_special=special),
                               None)

    costs = verification_costs(model, tokens_of(PROMPTS["essay"]))
    print(f"{args.model}: cost of a pass over 1 + k tokens, in single-token passes: "
          + ", ".join(f"k={k}: {c:.2f}" for k, c in costs.items()))
    for name, text in PROMPTS.items():
        prompt = tokens_of(text)
        answer = greedy_answer(model, prompt)
        figures = []
        for k_max in (1, 2, 4, 8):
            speed, proposed, accepted = replay(prompt, answer, k_max, costs)
            figures.append(f"K={k_max}: {speed:.2f} ({accepted}/{proposed} accepted)")
        print(f"- {name} ({len(answer)} tokens): " + "; ".join(figures))
    model.close()


if __name__ == "__main__":
    main()
