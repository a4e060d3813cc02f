"""tunedModels records, validation and access rules over HTTP (no training runs here: the server has no worker)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from gemserve import cli
from gemserve.identity import Identities, read_secret
from tests.conftest import API_KEY, OTHER_KEY, Server

OWNER = {"x-goog-api-key": API_KEY}
OTHER = {"x-goog-api-key": OTHER_KEY}
EXAMPLES = [{"text_input": str(i), "output": str(i + 1)} for i in range(1, 9)]


def project_number(server: Server, key: str) -> int:
    secret = read_secret(server.data_dir)
    assert secret is not None
    return Identities(secret).project_number(key)


def body(**extra: Any) -> dict[str, Any]:
    return {"baseModel": "models/gemma-3-270m", "displayName": "Number Incrementer",
            "tuningTask": {"trainingData": {"examples": {"examples": EXAMPLES}}}, **extra}


def call(server: Server, method: str, path: str, headers: dict[str, str] = OWNER, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{server.url}/v1beta/{path}", headers=headers, timeout=30, **kwargs)


def create(server: Server, headers: dict[str, str] = OWNER, params: dict[str, str] | None = None,
           **extra: Any) -> dict[str, Any]:
    response = call(server, "POST", "tunedModels", headers, json=body(**extra), params=params or {})
    assert response.status_code == 200, response.text
    return response.json()


def test_create_returns_an_operation_and_the_model_is_creating(registry_server: Server) -> None:
    op = create(registry_server)
    model_name = op["metadata"]["tunedModel"]
    assert op["name"].startswith(model_name + "/operations/")
    assert op["metadata"]["@type"] == "type.googleapis.com/google.ai.generativelanguage.v1beta.CreateTunedModelMetadata"
    assert op["done"] is False
    assert model_name.startswith("tunedModels/number-incrementer-")
    model = call(registry_server, "GET", model_name).json()
    assert model["state"] == "CREATING"
    assert model["baseModel"] == "models/gemma-3-270m"
    assert model["tuningTask"]["hyperparameters"] == {"epochCount": 5, "batchSize": 4, "learningRate": 0.001}
    assert "trainingData" not in model["tuningTask"]  # input only, never echoed back
    assert model["temperature"] == 1.0 and model["topP"] == 0.95 and model["topK"] == 64
    assert call(registry_server, "GET", op["name"]).json()["name"] == op["name"]
    assert call(registry_server, "GET", f"{model_name}/operations").json()["operations"][0]["name"] == op["name"]


def test_hyperparameter_options(registry_server: Server) -> None:
    task = {"trainingData": {"examples": {"examples": EXAMPLES}},
            "hyperparameters": {"learningRateMultiplier": 2.0, "epochCount": 3, "batchSize": 2}}
    model_name = create(registry_server, tuningTask=task)["metadata"]["tunedModel"]
    hyper = call(registry_server, "GET", model_name).json()["tuningTask"]["hyperparameters"]
    assert hyper == {"epochCount": 3, "batchSize": 2, "learningRateMultiplier": 2.0, "learningRate": 0.002}


def test_chosen_id_and_conflict(registry_server: Server) -> None:
    op = create(registry_server, params={"tunedModelId": "my-chosen-id"})
    assert op["metadata"]["tunedModel"] == "tunedModels/my-chosen-id"
    again = call(registry_server, "POST", "tunedModels", json=body(), params={"tunedModelId": "my-chosen-id"})
    assert again.status_code == 409 and again.json()["error"]["status"] == "ALREADY_EXISTS"


INVALID = [
    ("no examples", {"tuningTask": {"trainingData": {"examples": {"examples": []}}}}, "training data is required"),
    ("no training data", {"tuningTask": {}}, "training data is required"),
    ("empty output", {"tuningTask": {"trainingData": {"examples": {"examples": [{"textInput": "a", "output": ""}]}}}},
     "examples[0].output"),
    ("missing input", {"tuningTask": {"trainingData": {"examples": {"examples": [{"output": "b"}]}}}},
     "examples[0].text_input"),
    ("negative epochs", {"tuningTask": {"trainingData": {"examples": {"examples": EXAMPLES}},
                                        "hyperparameters": {"epochCount": -1}}}, "epoch_count"),
    ("zero batch", {"tuningTask": {"trainingData": {"examples": {"examples": EXAMPLES}},
                                   "hyperparameters": {"batchSize": 0}}}, "batch_size"),
    ("negative learning rate", {"tuningTask": {"trainingData": {"examples": {"examples": EXAMPLES}},
                                               "hyperparameters": {"learningRate": -0.1}}}, "learning_rate"),
    ("both learning rates", {"tuningTask": {"trainingData": {"examples": {"examples": EXAMPLES}},
                                            "hyperparameters": {"learningRate": 0.1, "learningRateMultiplier": 2}}},
     "mutually exclusive"),
    ("unknown base model", {"baseModel": "models/nope"}, "base_model"),
    ("display name too long", {"displayName": "x" * 41}, "display_name"),
    ("temperature out of range", {"temperature": 5}, "temperature"),
    ("unknown field", {"tuningTaskk": {}}, 'Unknown name "tuningTaskk"'),
    ("blank output", {"tuningTask": {"trainingData": {"examples": {"examples": [{"textInput": "a", "output": " "}]}}}},
     "examples[0].output"),
    ("top_k beyond int32", {"topK": 2**63}, "top_k"),
    ("impossible project number", {"readerProjectNumbers": [10**30]}, "reader_project_numbers[0]"),
    ("unknown source model", {"baseModel": None, "tunedModelSource": {"tunedModel": "tunedModels/nope"}},
     "tunedModels/nope"),
]


@pytest.mark.parametrize(("name", "change", "words"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_create_requests(registry_server: Server, name: str, change: dict[str, Any], words: str) -> None:
    payload = {k: v for k, v in {**body(), **change}.items() if v is not None}
    response = call(registry_server, "POST", "tunedModels", json=payload)
    assert 400 <= response.status_code < 500, response.text
    assert words.lower() in response.json()["error"]["message"].lower()


@pytest.mark.parametrize("bad_id", ["9starts-with-digit", "Upper", "ends-with-", "x" * 41, "under_score",
                                    "trailing-newline\n"])
def test_invalid_tuned_model_ids(registry_server: Server, bad_id: str) -> None:
    response = call(registry_server, "POST", "tunedModels", json=body(), params={"tunedModelId": bad_id})
    assert response.status_code == 400 and "tuned_model_id" in response.json()["error"]["message"]


def test_other_keys_cannot_see_a_model_until_shared_as_reader(registry_server: Server) -> None:
    name = create(registry_server)["metadata"]["tunedModel"]
    for method, path in (("GET", name), ("DELETE", name), ("PATCH", name), ("GET", f"{name}/operations")):
        response = call(registry_server, method, path, OTHER, json={})
        assert response.status_code == 404, (method, path, response.text)
    assert name not in [m["name"] for m in call(registry_server, "GET", "tunedModels", OTHER).json().get(
        "tunedModels", [])]
    reader = project_number(registry_server, OTHER_KEY)
    shared = call(registry_server, "PATCH", name, json={"readerProjectNumbers": [reader]},
                  params={"updateMask": "readerProjectNumbers"})
    assert shared.status_code == 200, shared.text
    assert call(registry_server, "GET", name, OTHER).status_code == 200
    listed = call(registry_server, "GET", "tunedModels", OTHER, params={"filter": "readers:me"}).json()
    assert name in [m["name"] for m in listed["tunedModels"]]
    # a reader may not change or delete it
    assert call(registry_server, "PATCH", name, OTHER, json={"description": "mine now"}).status_code == 403
    assert call(registry_server, "DELETE", name, OTHER).status_code == 403


def test_generating_with_a_model_still_creating_is_a_failed_precondition(registry_server: Server) -> None:
    name = create(registry_server)["metadata"]["tunedModel"]
    response = call(registry_server, "POST", f"{name}:generateContent",
                    json={"contents": [{"parts": [{"text": "3"}]}]})
    assert response.status_code == 400
    assert response.json()["error"]["status"] == "FAILED_PRECONDITION"


def test_patch_with_and_without_update_mask(registry_server: Server) -> None:
    name = create(registry_server)["metadata"]["tunedModel"]
    patched = call(registry_server, "PATCH", name, json={"description": "adds one", "topK": 5}).json()
    assert patched["description"] == "adds one" and patched["topK"] == 5
    masked = call(registry_server, "PATCH", name, json={"displayName": "Renamed", "description": "ignored"},
                  params={"updateMask": "display_name"}).json()
    assert masked["displayName"] == "Renamed" and masked["description"] == "adds one"
    immutable = call(registry_server, "PATCH", name, json={"baseModel": "models/other"})
    assert immutable.status_code == 400 and "immutable" in immutable.json()["error"]["message"]
    masked_bad = call(registry_server, "PATCH", name, json={}, params={"updateMask": "baseModel"})
    assert masked_bad.status_code == 400 and "update_mask" in masked_bad.json()["error"]["message"]


def test_list_pages_and_filters(registry_server: Server) -> None:
    for i in range(3):
        create(registry_server, displayName=f"Pager {i}", description="paging test zebra")
    seen: list[str] = []
    token = None
    for _ in range(10):
        params = {"pageSize": "2", "filter": "zebra"} | ({"pageToken": token} if token else {})
        page = call(registry_server, "GET", "tunedModels", params=params).json()
        seen += [m["name"] for m in page["tunedModels"]]
        token = page.get("nextPageToken")
        if not token:
            break
    assert len(seen) == 3 == len(set(seen))
    first = call(registry_server, "GET", "tunedModels", params={"pageSize": "1", "filter": "zebra"}).json()
    other_query = call(registry_server, "GET", "tunedModels",
                       params={"pageToken": first["nextPageToken"], "filter": "other"})
    assert other_query.status_code == 400 and "page_token" in other_query.json()["error"]["message"]
    other_caller = call(registry_server, "GET", "tunedModels", OTHER,
                        params={"pageToken": first["nextPageToken"], "filter": "zebra"})
    assert other_caller.status_code == 400


def test_delete_and_cancel(registry_server: Server) -> None:
    op = create(registry_server)
    name = op["metadata"]["tunedModel"]
    assert call(registry_server, "POST", f"{op['name']}:cancel").json() == {}
    assert call(registry_server, "DELETE", name).json() == {}
    assert call(registry_server, "GET", name).status_code == 404


def test_the_cli_prints_the_servers_project_number(registry_server: Server, capsys: pytest.CaptureFixture[str],
                                                   ) -> None:
    cli.main(["project-number", OTHER_KEY, "--data-dir", str(registry_server.data_dir)])
    assert capsys.readouterr().out.strip() == str(project_number(registry_server, OTHER_KEY))
