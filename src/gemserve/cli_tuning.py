"""`gemserve tune` and `gemserve tuned-models list`: clients of a running server's tunedModels API.

They speak plain HTTP to the server (`--server`, key from `--api-key` or $GEMSERVE_API_KEY), exactly as any
Gemini client would, so they work against a server on another machine too.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm  # type: ignore[import-untyped]

POLL_SECONDS = 1.0


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    tune = commands.add_parser("tune", help="tune a model on a JSONL or CSV file of examples")
    _client_flags(tune)
    tune.add_argument("examples", type=Path, help="JSONL ({\"text_input\": ..., \"output\": ...} per line) or CSV "
                      "(columns text_input,output)")
    tune.add_argument("--base-model", default="models/gemma-3-270m")
    tune.add_argument("--source-model", default=None, help="tune further from this tunedModels/... instead")
    tune.add_argument("--display-name", default=None)
    tune.add_argument("--id", default=None, help="the tuned model id (default: from the display name)")
    tune.add_argument("--epochs", type=int, default=None)
    tune.add_argument("--batch-size", type=int, default=None)
    tune.add_argument("--learning-rate", type=float, default=None)
    tune.add_argument("--no-wait", action="store_true", help="print the operation and return at once")

    tuned = commands.add_parser("tuned-models", help="tuned models on a server")
    actions = tuned.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="list the tuned models this key can see")
    _client_flags(listing)
    listing.add_argument("--filter", default=None)


def _client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default="http://127.0.0.1:8080")
    parser.add_argument("--api-key", default=os.environ.get("GEMSERVE_API_KEY", ""))


def run(args: argparse.Namespace) -> None:
    headers = {"x-goog-api-key": args.api_key} if args.api_key else {}
    with httpx.Client(base_url=args.server.rstrip("/") + "/v1beta/", headers=headers, timeout=60) as client:
        if args.command == "tune":
            _tune(client, args)
        else:
            _list(client, args.filter)


def read_examples(path: Path) -> list[dict[str, str]]:
    """Examples from JSONL or CSV; each needs text_input (or input) and output."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SystemExit(f"gemserve: cannot read {path}: {exc}") from None
    if path.suffix.lower() == ".csv":
        rows: list[dict[str, Any]] = list(csv.DictReader(text.splitlines()))
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise SystemExit(f"gemserve: {path}:{number}: not JSON: {exc.msg}") from None
    examples = []
    for number, row in enumerate(rows, 1):
        text_input = row.get("text_input", row.get("input")) if isinstance(row, dict) else None
        output = row.get("output") if isinstance(row, dict) else None
        if not isinstance(text_input, str) or not isinstance(output, str):
            raise SystemExit(f"gemserve: {path}: example {number} needs text_input and output strings")
        examples.append({"text_input": text_input, "output": output})
    if not examples:
        raise SystemExit(f"gemserve: {path} holds no examples")
    return examples


def _tune(client: httpx.Client, args: argparse.Namespace) -> None:
    hyper = {k: v for k, v in (("epochCount", args.epochs), ("batchSize", args.batch_size),
                                ("learningRate", args.learning_rate)) if v is not None}
    body: dict[str, Any] = {"tuningTask": {"trainingData": {"examples": {"examples": read_examples(args.examples)}},
                                           "hyperparameters": hyper}}
    if args.source_model:
        body["tunedModelSource"] = {"tunedModel": args.source_model}
    else:
        body["baseModel"] = args.base_model
    if args.display_name:
        body["displayName"] = args.display_name
    op = _ok(client.post("tunedModels", json=body, params={"tunedModelId": args.id} if args.id else {}))
    model = op["metadata"]["tunedModel"]
    if args.no_wait:
        print(json.dumps(op, indent=2))
        return
    with tqdm(total=None, unit="step", desc=model, file=sys.stderr) as bar:
        while not op.get("done"):
            time.sleep(POLL_SECONDS)
            op = _ok(client.get(op["name"]))
            meta = op["metadata"]
            bar.total = meta.get("totalSteps") or None
            bar.n = meta.get("completedSteps", 0)
            if meta.get("snapshots"):
                bar.set_postfix(loss=f"{meta['snapshots'][-1]['meanLoss']:.4f}")
            bar.refresh()
    if "error" in op:
        raise SystemExit(f"gemserve: tuning {model} failed: {op['error'].get('message')}")
    print(model)


def _list(client: httpx.Client, filter_text: str | None) -> None:
    token = None
    while True:
        params = {k: v for k, v in (("pageToken", token), ("filter", filter_text), ("pageSize", "100")) if v}
        page = _ok(client.get("tunedModels", params=params))
        for model in page.get("tunedModels", []):
            source = model.get("baseModel") or model.get("tunedModelSource", {}).get("tunedModel", "")
            print(f"{model['name']}\t{model['state']}\t{source}\t{model.get('displayName', '')}")
        token = page.get("nextPageToken")
        if not token:
            return


def _ok(response: httpx.Response) -> dict[str, Any]:
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        raise SystemExit(f"gemserve: the server answered {response.status_code}: {message}")
    data: dict[str, Any] = response.json()
    return data
