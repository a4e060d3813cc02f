"""The built-in models, and which model a Gemini model name reaches."""

from __future__ import annotations

from pathlib import Path

import pytest

from gemserve.engine.embedding import read_layout
from gemserve.models.catalog import (
    EMBEDDING_MODEL_ID,
    INSTRUCT_MODEL_ID,
    PACKAGED,
    CatalogError,
    load_catalog,
    packaged_minilm,
)
from tests.engine.tiny_encoder import make_encoder_dir


def test_three_models_are_built_in_and_gemini_names_reach_the_instruct_model() -> None:
    catalog = load_catalog(None)
    assert set(catalog.models) == {"gemma-3-270m", INSTRUCT_MODEL_ID, EMBEDDING_MODEL_ID}
    for name in ("gemini-2.5-flash", "models/gemini-2.0-flash", "gemini-1.5-pro", "gemini-3-pro-preview"):
        spec = catalog.resolve(name)
        assert spec is not None and spec.id == INSTRUCT_MODEL_ID
    assert catalog.resolve("gpt-4") is None


def test_an_alias_wins_over_the_gemini_rule() -> None:
    catalog = load_catalog(None, {"gemini-2.0-flash": "gemma-3-270m"})
    assert catalog.resolve("gemini-2.0-flash").id == "gemma-3-270m"  # type: ignore[union-attr]
    assert catalog.resolve("gemini-2.5-flash").id == INSTRUCT_MODEL_ID  # type: ignore[union-attr]


def test_gemini_names_can_be_pointed_elsewhere_or_turned_off(tmp_path: Path) -> None:
    config = tmp_path / "gemserve.toml"
    config.write_text('gemini_model = "gemma-3-270m"\n')
    assert load_catalog(config).resolve("gemini-2.5-pro").id == "gemma-3-270m"  # type: ignore[union-attr]
    config.write_text('gemini_model = ""\n')
    assert load_catalog(config).resolve("gemini-2.5-pro") is None
    config.write_text('gemini_model = "nope"\n')
    with pytest.raises(CatalogError, match="unknown model 'nope'"):
        load_catalog(config)


def test_the_instruct_model_is_found_in_its_installed_chunk_packages() -> None:
    packaged = PACKAGED[INSTRUCT_MODEL_ID]()
    assert [p.name for p in packaged.chunks] == [f"part0{n}.bin" for n in range(1, 7)]
    assert sum(p.stat().st_size for p in packaged.chunks) == 491400064
    assert len(packaged.sha256) == 64


def test_google_embedding_names_reach_the_embedding_model() -> None:
    catalog = load_catalog(None)
    for name in ("text-embedding-004", "models/gemini-embedding-001", "embedding-001", "gemini-embedding-2"):
        spec = catalog.resolve(name)
        assert spec is not None and spec.id == EMBEDDING_MODEL_ID and spec.kind == "embed"
    assert catalog.resolve("text-embedding-005") is None


def test_the_embedding_model_is_the_sentence_transformers_directory_of_its_package() -> None:
    layout = read_layout(packaged_minilm())
    assert (layout.pooling, layout.max_tokens, layout.dimensions) == ("mean", 256, 384)


def test_embedding_models_come_from_configuration(tmp_path: Path) -> None:
    make_encoder_dir(tmp_path / "tiny")
    config = tmp_path / "gemserve.toml"
    config.write_text('embedding_model = "tiny"\n[models.tiny]\npath = "tiny"\nkind = "embed"\n')
    catalog = load_catalog(config)
    assert catalog.resolve("gemini-embedding-2").id == "tiny"  # type: ignore[union-attr]
    assert catalog.resolve("text-embedding-004").id == EMBEDDING_MODEL_ID  # type: ignore[union-attr]
    config.write_text('[models.tiny]\npath = "tiny"\nkind = "vision"\n')
    with pytest.raises(CatalogError, match="kind must be one of generate, embed"):
        load_catalog(config)
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    config.write_text('[models.tiny]\npath = "x.gguf"\nkind = "embed"\n')
    with pytest.raises(CatalogError, match="sentence-transformers"):
        load_catalog(config)
