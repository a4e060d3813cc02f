"""A bounded fuzz run: schemathesis drives the whole application (in process, a scripted model behind it) from
its own /openapi.json, with API keys, and no request may get a 5xx or break the document's promises."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemserve.api.app import create_app
from gemserve.config import Settings
from gemserve.models.catalog import Catalog, ModelSpec
from gemserve.models.registry import ModelRegistry
from tests.service.scripted import ScriptedEngine

KEY = "fuzz-key"
EXAMPLES = 12
METHODS = ["generateContent", "streamGenerateContent", "countTokens"]


def scripted_app(data_dir: Path) -> FastAPI:
    spec = ModelSpec(id="scripted", display_name="scripted", description="", path=data_dir / "none.gguf")
    catalog = Catalog(models={"scripted": spec}, gemini_model="scripted")
    registry = ModelRegistry(catalog, data_dir, lambda path, spec: ScriptedEngine("A short answer."))
    registry.load_all()
    return create_app(Settings(data_dir=data_dir, api_keys=frozenset({KEY}), tuning_worker=False), registry)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastAPI]:
    yield scripted_app(tmp_path_factory.mktemp("fuzz"))


def test_the_document_describes_the_routes(app: FastAPI) -> None:
    document = app.openapi()
    paths = document["paths"]
    assert {"/{version}/models/{name_and_method}", "/{version}/files", "/upload/{version}/files",
            "/{version}/tunedModels", "/{version}/cachedContents"} <= set(paths)
    body = paths["/{version}/models/{name_and_method}"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/GenerateContentRequest"}
    contents = document["components"]["schemas"]["GenerateContentRequest"]["properties"]["contents"]
    assert contents["items"] == {"$ref": "#/components/schemas/Content"}


def test_no_request_breaks_the_server(app: FastAPI) -> None:
    """Every operation, a bounded number of generated requests each (the same ones every run)."""
    api = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:
        fuzz(operation)


def fuzz(operation: schemathesis.APIOperation) -> None:
    generating = operation.path == "/{version}/models/{name_and_method}"

    @given(case=operation.as_strategy(), method=st.sampled_from(METHODS))
    @settings(max_examples=EXAMPLES * 4 if generating else EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case: schemathesis.Case, method: str) -> None:
        case.headers = {**(case.headers or {}), "x-goog-api-key": KEY}
        if generating:  # bodies for a model that exists
            case.path_parameters = {**(case.path_parameters or {}), "name_and_method": f"scripted:{method}"}
        response = case.call()
        assert response.status_code < 500, (case.method, case.formatted_path, case.body, response.text[:300])
        if response.status_code >= 400:
            assert set(response.json()["error"]) >= {"code", "message", "status"}

    run()
