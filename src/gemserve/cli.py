"""The `gemserve` command: `serve` runs the API server; `models` lists what a configuration would serve."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from gemserve import cli_tuning
from gemserve.config import (
    Settings,
    allowed_hosts_from_env,
    api_keys_from_env,
    check_data_dir,
    config_file_from,
    parse_aliases,
)
from gemserve.identity import SECRET_FILE, Identities, read_secret
from gemserve.logs import setup_logging
from gemserve.models.catalog import CatalogError, ModelSpec, load_catalog
from gemserve.sandbox.bwrap import default_python


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gemserve", description="A self-hosted Gemini API server.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the Gemini API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    _add_model_flags(serve)
    serve.add_argument("--threads", type=int, default=None, help="engine threads (default: all cores)")
    serve.add_argument("--max-sequences", type=int, default=8, help="sequences decoded together per model")
    serve.add_argument("--cache-tokens", type=int, default=None,
                       help="KV cache tokens that cachedContents may hold, per model (default: half the cache)")
    serve.add_argument("--context-size", type=int, default=None,
                       help="KV cache tokens shared by a model's sequences (default: the model's window)")
    serve.add_argument("--no-tuning-worker", action="store_true",
                       help="do not run the tuning worker in this server (run `python -m gemserve.tuning.worker "
                       "--data-dir D` elsewhere, or tuning jobs wait)")
    serve.add_argument("--sandbox-python", default=None, metavar="PYTHON",
                       help="the Python that runs the codeExecution tool's code, in a bubblewrap sandbox "
                       "(default: .venv-sandbox beside gemserve's environment, made by scripts/setup.sh)")
    serve.add_argument("--tuning-seed", type=int, default=None, metavar="N",
                       help="the seed of every tuning job (default: a random one each): the same training data and "
                       "hyperparameters then give the same adapter")
    serve.add_argument("--safety-judge", default=None, metavar="MODEL",
                       help="a served generative model that rates safety settings' harm categories, such as a "
                       "ShieldGemma GGUF from the model config (default: the built-in classifier on the embedding "
                       "model; docs/safety.md)")
    serve.add_argument("--log-level", default="info")

    listing = commands.add_parser("models", help="list the models and aliases a configuration serves")
    _add_model_flags(listing)

    number = commands.add_parser("project-number", help="the project number of an API key, for readerProjectNumbers")
    number.add_argument("key")
    number.add_argument("--data-dir", default="./data", help="the server's data directory (its secret is there)")
    cli_tuning.add_commands(commands)

    args = parser.parse_args(argv)
    if args.command == "project-number":
        secret = read_secret(Path(args.data_dir).expanduser())
        if secret is None:
            raise SystemExit(f"gemserve: {args.data_dir} has no {SECRET_FILE}: start the server once with this "
                             "--data-dir (project numbers depend on its secret)")
        print(Identities(secret).project_number(args.key))
        return
    if args.command in ("tune", "tuned-models"):
        cli_tuning.run(args)
        return
    data_dir = Path(args.data_dir).expanduser().resolve()
    try:
        catalog = load_catalog(config_file_from(args.config, data_dir), parse_aliases(args.alias))
    except CatalogError as exc:
        raise SystemExit(f"gemserve: {exc}") from None
    if args.command == "models":
        for spec in catalog.models.values():
            names = [a for a, target in catalog.aliases.items() if target == spec.id]
            print(f"models/{spec.id}\t{spec.kind}\t{spec.path or 'packaged'}\taliases: {', '.join(names) or '-'}")
        return
    settings = Settings(
        data_dir=data_dir, host=args.host, port=args.port, api_keys=api_keys_from_env(),
        allowed_hosts=allowed_hosts_from_env(),
        threads=args.threads,
        max_sequences=args.max_sequences, context_size=args.context_size, tuning_worker=not args.no_tuning_worker,
        cache_tokens=args.cache_tokens,
        sandbox_python=Path(args.sandbox_python).expanduser() if args.sandbox_python else default_python(),
        tuning_seed=args.tuning_seed, safety_judge=args.safety_judge,
    )
    _serve(settings, catalog, args.log_level)


MAX_CONNECTIONS = 1000


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default="./data", help="where models, caches and records live")
    parser.add_argument("--config", default=None, help="model configuration (TOML); default: "
                        "$GEMSERVE_CONFIG or <data-dir>/gemserve.toml")
    parser.add_argument("--alias", action="append", default=[], metavar="NAME=MODEL",
                        help="serve MODEL under another name too, e.g. gemini-2.0-flash=gemma-3-270m")


def _serve(settings: Settings, catalog, log_level: str) -> None:  # type: ignore[no-untyped-def]
    import uvicorn

    from gemserve.api.app import create_app
    from gemserve.api.http import StatusH11Protocol
    from gemserve.engine.backends import EngineOptions, load_engine
    from gemserve.engine.embedding import EmbeddingEngine
    from gemserve.engine.types import Engine
    from gemserve.models.registry import ModelRegistry
    from gemserve.store.db import DatabaseError

    setup_logging(log_level)
    check_data_dir(settings.data_dir)

    def engine_factory(path: Path, spec: ModelSpec) -> Engine:
        return load_engine(path, EngineOptions(context_size=spec.context_size or settings.context_size,
                                               max_sequences=settings.max_sequences, threads=settings.threads,
                                               pin_budget=settings.cache_tokens))

    def embedder_factory(path: Path, spec: ModelSpec) -> EmbeddingEngine:
        return EmbeddingEngine(path, threads=settings.threads)

    registry = ModelRegistry(catalog, settings.data_dir, engine_factory, embedder_factory)
    registry.load_all()
    if settings.open_mode:
        logging.getLogger("gemserve").warning(
            "open local mode: no API keys configured (set GEMSERVE_API_KEYS to require keys)")
    try:
        app = create_app(settings, registry)
    except DatabaseError as exc:
        registry.close()
        raise SystemExit(f"gemserve: {exc}") from None
    except OSError as exc:  # the server's secret could not be written (a full disk, say)
        registry.close()
        raise SystemExit(f"gemserve: cannot set up the data directory {settings.data_dir}: {exc}") from None
    # Connections beyond the limit are answered 503 at once rather than piling up; idle ones close after 30 s.
    uvicorn.run(app, host=settings.host, port=settings.port, access_log=False, log_config=None,
                timeout_graceful_shutdown=5, limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=30,
                http=StatusH11Protocol)


if __name__ == "__main__":
    main()
