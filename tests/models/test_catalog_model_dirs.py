"""Catalog entries whose path is a Hugging Face model directory rather than a GGUF file."""

from __future__ import annotations

from pathlib import Path

import pytest

from gemserve.models.catalog import CatalogError, load_catalog


def write_config(tmp_path: Path, model_path: str) -> Path:
    config = tmp_path / "gemserve.toml"
    config.write_text(f'[models.tiny]\npath = "{model_path}"\naliases = ["gemini-2.0-flash"]\n')
    return config


def test_a_model_directory_with_config_json_is_served(tmp_path: Path) -> None:
    (tmp_path / "tiny-hf").mkdir()
    (tmp_path / "tiny-hf" / "config.json").write_text("{}")
    catalog = load_catalog(write_config(tmp_path, "tiny-hf"))  # relative to the configuration file
    spec = catalog.resolve("models/gemini-2.0-flash")
    assert spec is not None and spec.id == "tiny"
    assert spec.path == (tmp_path / "tiny-hf").resolve()


def test_a_directory_without_config_json_is_refused(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    with pytest.raises(CatalogError, match="directory without config.json"):
        load_catalog(write_config(tmp_path, "weights"))


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CatalogError, match=r"not a GGUF file \(\*\.gguf\) or a Hugging Face model directory"):
        load_catalog(write_config(tmp_path, "model.safetensors"))


def test_a_missing_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="is not a file or a directory"):
        load_catalog(write_config(tmp_path, "nowhere"))
