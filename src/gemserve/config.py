"""One settings object, read once from the command line and the environment, checked at start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

API_KEYS_ENV = "GEMSERVE_API_KEYS"
ALLOWED_HOSTS_ENV = "GEMSERVE_ALLOWED_HOSTS"
CONFIG_ENV = "GEMSERVE_CONFIG"


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080
    api_keys: frozenset[str] = frozenset()  # empty: open local mode, no key needed
    threads: int | None = None  # engine threads; None: all cores
    max_sequences: int = 8  # sequences decoded together per model
    context_size: int | None = None  # KV cache tokens shared by all sequences; None: the model's window
    cache_tokens: int | None = None  # of those, what cachedContents' prefixes may hold; None: half
    tuning_worker: bool = True  # run the tuning worker beside the server
    # Open mode: host names (besides IP addresses and localhost) that requests may be addressed to.
    allowed_hosts: frozenset[str] = frozenset()
    sandbox_python: Path | None = None  # the Python the codeExecution tool runs code with; None: not available
    tuning_seed: int | None = None  # every tuning job's seed; None: a random one each
    safety_judge: str | None = None  # a served model that rates safety instead of the embedding head

    @property
    def open_mode(self) -> bool:
        return not self.api_keys


def api_keys_from_env(environ: dict[str, str] | None = None) -> frozenset[str]:
    raw = (environ if environ is not None else os.environ).get(API_KEYS_ENV, "")
    return frozenset(key.strip() for key in raw.split(",") if key.strip())


def allowed_hosts_from_env(environ: dict[str, str] | None = None) -> frozenset[str]:
    raw = (environ if environ is not None else os.environ).get(ALLOWED_HOSTS_ENV, "")
    return frozenset(host.strip().lower() for host in raw.split(",") if host.strip())


def config_file_from(flag: str | None, data_dir: Path, environ: dict[str, str] | None = None) -> Path | None:
    """`--config`, else $GEMSERVE_CONFIG, else `<data-dir>/gemserve.toml` when it exists."""
    env = environ if environ is not None else os.environ
    chosen = flag or env.get(CONFIG_ENV)
    if chosen:
        path = Path(chosen).expanduser()
        if not path.is_file():
            raise SystemExit(f"gemserve: configuration file {path} does not exist")
        return path
    default = data_dir / "gemserve.toml"
    return default if default.is_file() else None


def parse_aliases(values: list[str]) -> dict[str, str]:
    """`--alias gemini-2.0-flash=gemma-3-270m` flags into a mapping."""
    aliases = {}
    for value in values:
        alias, sep, target = value.partition("=")
        if not sep or not alias or not target:
            raise SystemExit(f"gemserve: --alias takes NAME=MODEL, got {value!r}")
        aliases[alias.strip()] = target.strip()
    return aliases


def check_data_dir(data_dir: Path) -> None:
    """Fail at start-up, naming the problem, when the data directory cannot be created or written."""
    probe = data_dir / ".gemserve-write-check"
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise SystemExit(f"gemserve: the data directory {data_dir} is not writable ({exc.strerror}). gemserve keeps "
                         "its models, database and tuning jobs there: give it a writable directory with "
                         "--data-dir.") from None
