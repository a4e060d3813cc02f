"""`/openapi.json`: the routes as served, with the request bodies the routes read themselves.

The routes read their JSON bodies by hand (`api/streaming.read_json`: size limits, timeouts, Google's lenient
parsing), so FastAPI cannot see them; this document adds each body's schema from the pydantic models that check
it, and says which API versions the `{version}` segment takes. A fuzzer (schemathesis) can drive the server from it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from gemserve.schema.content import GenerateContentRequest
from gemserve.schema.tuning import TunedModelIn
from gemserve.service.cached_contents import CachedContentIn

BODIES: dict[tuple[str, str], type[BaseModel]] = {
    ("/{version}/models/{name_and_method}", "post"): GenerateContentRequest,
    ("/{version}/tunedModels/{name_and_method}", "post"): GenerateContentRequest,
    ("/{version}/tunedModels", "post"): TunedModelIn,
    ("/{version}/tunedModels/{model_id}", "patch"): TunedModelIn,
    ("/{version}/cachedContents", "post"): CachedContentIn,
    ("/{version}/cachedContents/{cache_id}", "patch"): CachedContentIn,
}
VERSIONS = ["v1", "v1beta"]


def openapi_document(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    document = get_openapi(title="gemserve", version="0.1.0", routes=app.routes,
                           description="A self-hosted implementation of the Gemini REST API (v1 and v1beta).")
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for model in dict.fromkeys(BODIES.values()):
        schema = model.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    for (path, method), model in BODIES.items():
        operation = document["paths"][path][method]
        operation["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
    for item in document["paths"].values():
        for operation in item.values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "version" and parameter["in"] == "path":
                    parameter["schema"] = {"type": "string", "enum": VERSIONS}
    document["components"]["securitySchemes"] = {
        "apiKey": {"type": "apiKey", "in": "header", "name": "x-goog-api-key"}}
    document["security"] = [{"apiKey": []}]
    app.openapi_schema = document
    return document
