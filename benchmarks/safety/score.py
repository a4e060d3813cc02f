"""Scores safety classifiers on the team's labelled evaluation set (eval.jsonl): precision and recall per
category at each blocking threshold, the share of benign look-alikes blocked, and time per text.

    .venv/bin/python benchmarks/safety/score.py                  # the default classifier
    .venv/bin/python benchmarks/safety/score.py --classifier judge:qwen2.5-coder-0.5b-instruct

Each text is rated as the server rates a prompt (service/safety.py: in sentence-sized pieces, each category's
highest probability over them). A harmful text of category C counts as caught at a threshold when C's rating
reaches it; a benign text counts as blocked when any category's does (as a request with that threshold for all
five categories would be).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from gemserve.engine.backends.llamacpp import LlamaCppEngine
from gemserve.engine.embedding import EmbeddingEngine
from gemserve.models.catalog import builtin_models, packaged_gguf, packaged_minilm
from gemserve.models.chat_format import ChatFormat
from gemserve.models.registry import ServedModel
from gemserve.safety.classifiers import Classifier, Combined, EmbeddingClassifier, JudgeClassifier, ProfanityClassifier
from gemserve.safety.policy import BLOCKS_FROM, CATEGORIES, SafetyPolicy, level
from gemserve.service.safety import Guard

EVAL = Path(__file__).with_name("eval.jsonl")


def build(name: str, data_dir: Path) -> tuple[Classifier, list[object]]:
    """The classifier named on the command line, and what to close after."""
    if name.startswith("judge:"):
        model_id = name.removeprefix("judge:")
        engine = LlamaCppEngine(packaged_gguf(model_id, data_dir))
        meta = engine.metadata
        served = ServedModel(builtin_models()[model_id], engine,
                             ChatFormat(meta.chat_template, meta.architecture, meta.bos_text, meta.eos_text))
        return Combined(JudgeClassifier(served), ProfanityClassifier()), [engine]
    embedder = EmbeddingEngine(packaged_minilm())
    if name == "profanity":
        return ProfanityClassifier(), [embedder]
    return EmbeddingClassifier(embedder), [embedder]


async def score(classifier: Classifier, rows: list[dict]) -> tuple[list[dict[str, float]], list[float]]:
    """Each text rated as the server rates a prompt: in sentence-sized pieces, the highest over them."""
    guard = Guard(classifier, SafetyPolicy(tuple((c, "BLOCK_NONE") for c in CATEGORIES)), [])
    await classifier.probabilities(["warm-up"])  # trains, loads
    results, times = [], []
    for row in rows:  # one at a time, as prompts arrive
        start = time.perf_counter()
        probabilities = await guard.probabilities([row["text"]])
        times.append(time.perf_counter() - start)
        results.append(probabilities)
    return results, times


def report(rows: list[dict], results: list[dict[str, float]], times: list[float]) -> str:
    lines = ["| threshold | category | precision | recall | benign look-alikes blocked (any category) |",
             "|---|---|---|---|---|"]
    for threshold, from_level in BLOCKS_FROM.items():
        blocked_benign = sum(1 for row, p in zip(rows, results, strict=True) if row["category"] is None
                             and any(level(p.get(c, 0.0)) >= from_level for c in CATEGORIES))
        benign = sum(1 for row in rows if row["category"] is None)
        for category in CATEGORIES:
            flagged = [row for row, p in zip(rows, results, strict=True) if level(p.get(category, 0.0)) >= from_level]
            hits = sum(1 for row in flagged if row["category"] == category)
            positives = sum(1 for row in rows if row["category"] == category)
            precision = hits / len(flagged) if flagged else float("nan")
            lines.append(f"| {threshold} | {category.removeprefix('HARM_CATEGORY_')} | {precision:.2f} | "
                         f"{hits / positives:.2f} | {blocked_benign}/{benign} ({blocked_benign / benign:.0%}) |")
        harmful = [(row, p) for row, p in zip(rows, results, strict=True) if row["category"] is not None]
        caught = sum(1 for _, p in harmful if any(level(p.get(c, 0.0)) >= from_level for c in CATEGORIES))
        lines.append(f"| {threshold} | any (harmful blocked at all) | | {caught / len(harmful):.2f} | |")
    ms = sorted(1000 * t for t in times)
    lines.append("")
    lines.append(f"time per text: median {statistics.median(ms):.0f} ms, p90 {ms[int(0.9 * len(ms))]:.0f} ms, "
                 f"max {ms[-1]:.0f} ms ({len(rows)} texts, one at a time)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classifier", default="default",
                        help="default (the embedding head), profanity, or judge:MODEL_ID")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--dump", type=Path, help="write each text's probabilities here (JSON lines)")
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in EVAL.read_text(encoding="utf-8").splitlines() if line.strip()]
    classifier, owned = build(args.classifier, args.data_dir)
    try:
        results, times = asyncio.run(score(classifier, rows))
    finally:
        for thing in owned:
            thing.close()  # type: ignore[attr-defined]
    if args.dump:
        args.dump.write_text("".join(json.dumps({"id": r["id"], "category": r["category"], "p": p}) + "\n"
                                     for r, p in zip(rows, results, strict=True)))
    print(f"classifier: {args.classifier}")
    print(report(rows, results, times))


if __name__ == "__main__":
    sys.exit(main())
