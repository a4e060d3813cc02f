"""Routes of the Files API: `/upload/{v1,v1beta}/files` (media.upload) and `/{v1,v1beta}/files` (get, list, delete).

An upload comes in one of Google's protocols:
- resumable (`X-Goog-Upload-Protocol: resumable`, what the official clients use): a `start` request with the key
  answers with `X-Goog-Upload-URL`; chunks go there without a key (`upload`, `upload, finalize`, `query`);
- multipart (`multipart/related`: the JSON metadata, then the bytes);
- plain (`uploadType=media` or `X-Goog-Upload-Protocol: raw`): the bytes, typed by Content-Type.
"""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from gemserve.api.deps import CallerDep, caller, check_local_request, check_query, settings_of
from gemserve.api.errors import error_response
from gemserve.api.models import check_version
from gemserve.api.streaming import read_json
from gemserve.bodies import next_chunk
from gemserve.errors import ApiError, invalid_argument, url_not_found
from gemserve.identity import Caller
from gemserve.service.files import CHUNK_TIMEOUT_SECONDS, Files, UploadStatus

router = APIRouter()
log = logging.getLogger("gemserve.files")
_DIGITS = re.compile(r"[0-9]{1,19}")

MAX_START_BODY_BYTES = 64 * 1024
MAX_MULTIPART_BYTES = 64 * 1024 * 1024


def files_of(request: Request) -> Files:
    service: Files = request.app.state.files
    return service


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


@router.post("/upload/{version}/files")
async def upload(version: str, request: Request) -> Response:
    check_version(version)
    files = files_of(request)
    upload_id = request.query_params.get("upload_id")
    if upload_id is not None:  # a chunk: the upload id is the credential, no key
        try:
            _check_chunk_request(request)
            return await _chunk(request, files, upload_id)
        except Exception as exc:  # without a status, the clients send the chunk again, three times
            if not isinstance(exc, ApiError):
                log.exception("upload chunk failed")
                exc = ApiError("INTERNAL", "An internal error has occurred.")
            response = error_response(exc)
            response.headers["X-Goog-Upload-Status"] = "final"
            return response
    who = caller(request)
    settings = settings_of(request)
    if settings.open_mode and request.headers.get("origin") == "null":
        # Uploads take any body: a sandboxed page (Origin: null) could post one without the browser asking first.
        raise ApiError("PERMISSION_DENIED", "Uploads from pages without an origin are refused in open local mode.")
    protocol = request.headers.get("x-goog-upload-protocol", "").strip().lower()
    content_type = request.headers.get("content-type", "").lower()
    if request.query_params.get("uploadType") == "resumable" and not protocol:
        # googleapiclient's protocol (google-generativeai's upload_file): a Location to PUT the bytes to.
        metadata = await _start_body(request)
        new_id = await files.start_upload(who, metadata, request.headers.get("x-upload-content-length"),
                                          request.headers.get("x-upload-content-type"))
        url = f"{base_url(request)}/upload/{version}/files?upload_id={new_id}&upload_protocol=resumable"
        return Response(status_code=200, headers={"Location": url})
    if protocol == "resumable":
        command = _commands(request)
        if command != {"start"}:
            raise invalid_argument("X-Goog-Upload-Command: a resumable upload begins with \"start\".",
                                   "X-Goog-Upload-Command")
        metadata = await _start_body(request)
        new_id = await files.start_upload(who, metadata, request.headers.get("x-goog-upload-header-content-length"),
                                          request.headers.get("x-goog-upload-header-content-type"))
        url = f"{base_url(request)}/upload/{version}/files?upload_id={new_id}&upload_protocol=resumable"
        return Response(status_code=200, headers={"X-Goog-Upload-URL": url, "X-Goog-Upload-Status": "active",
                                                   "X-Goog-Upload-Control-URL": url,
                                                   "X-Goog-Upload-Chunk-Granularity": "8388608"})
    if protocol == "multipart" or content_type.startswith("multipart/"):
        return JSONResponse(await _multipart(request, files, who))
    if protocol in ("raw", "") and request.query_params.get("uploadType", "media") == "media":
        mime = request.headers.get("content-type") or request.headers.get("x-goog-upload-header-content-type")
        new_id = await files.start_upload(who, {}, request.headers.get("content-length"), mime)
        try:
            status = await files.put(new_id, 0, request.stream(), True, base_url(request))
        except BaseException:
            await files.cancel_upload(new_id)
            raise
        return JSONResponse({"file": status.file})
    raise invalid_argument(f"X-Goog-Upload-Protocol: {protocol!r} is not an upload protocol (resumable, multipart "
                           "or raw).", "X-Goog-Upload-Protocol")


@router.put("/upload/{version}/files")
async def put_upload(version: str, request: Request, upload_id: str) -> Response:
    """A chunk of googleapiclient's resumable protocol: `Content-Range: bytes a-b/total` (or `bytes */total` to ask
    how much was stored); 308 with `Range` while the upload goes on, 200 with the file at the end."""
    check_version(version)
    _check_chunk_request(request)
    files = files_of(request)
    content_range = request.headers.get("content-range", "").strip()
    match = _CONTENT_RANGE.fullmatch(content_range) if content_range else None
    if content_range and match is None:
        raise invalid_argument(f"Content-Range: {content_range!r} is not a byte range.", "Content-Range")
    if match is not None and match.group("first") is None:  # `bytes */total`: how much is stored?
        return _incomplete(await files.query(upload_id))
    if match is None:  # the single PUT of an empty file (refused: a file has bytes)
        status = await files.put(upload_id, None, _nothing(), True, base_url(request))
        return JSONResponse({"file": status.file})
    first, last, total = int(match.group("first")), int(match.group("last")), match.group("total")
    final = total != "*" and last + 1 == int(total)
    status = await files.put(upload_id, first, request.stream(), final, base_url(request),
                             None if total == "*" else int(total))
    if status.file is None:
        return _incomplete(status.received)
    return JSONResponse({"file": status.file})


_CONTENT_RANGE = re.compile(r"bytes (?:(?P<first>\d{1,19})-(?P<last>\d{1,19})|\*)/(?P<total>\d{1,19}|\*)")


def _incomplete(received: int) -> Response:
    headers = {"Range": f"bytes=0-{received - 1}"} if received else {}
    return Response(status_code=308, headers=headers)


def _check_chunk_request(request: Request) -> None:
    check_query(request)
    settings = settings_of(request)
    if settings.open_mode:
        check_local_request(request, settings)


def _commands(request: Request) -> set[str]:
    return {c.strip().lower() for c in request.headers.get("x-goog-upload-command", "").split(",") if c.strip()}


async def _chunk(request: Request, files: Files, upload_id: str) -> Response:
    commands = _commands(request)
    if commands == {"query"}:
        received = await files.query(upload_id)
        return Response(status_code=200, headers={"X-Goog-Upload-Status": "active",
                                                  "X-Goog-Upload-Size-Received": str(received)})
    if not commands or not commands <= {"upload", "finalize"}:
        raise invalid_argument("X-Goog-Upload-Command: expected \"upload\", \"upload, finalize\", \"finalize\" or "
                               "\"query\".", "X-Goog-Upload-Command")
    raw_offset = request.headers.get("x-goog-upload-offset")
    offset: int | None = None
    if raw_offset is not None:
        if not _DIGITS.fullmatch(raw_offset.strip()):
            raise invalid_argument(f"X-Goog-Upload-Offset: {raw_offset!r} is not a byte offset.",
                                   "X-Goog-Upload-Offset")
        offset = int(raw_offset)
    body = request.stream() if "upload" in commands else _nothing()
    status: UploadStatus = await files.put(upload_id, offset, body, "finalize" in commands, base_url(request))
    if status.file is None:
        return Response(status_code=200, headers={"X-Goog-Upload-Status": "active",
                                                  "X-Goog-Upload-Size-Received": str(status.received)})
    return JSONResponse({"file": status.file}, headers={"X-Goog-Upload-Status": "final"})


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""


async def _start_body(request: Request) -> Any:
    """The start request's `{"file": {...}}`. Google reads it leniently, and its own curl example sends it with
    single quotes (`{'file': {'display_name': 'AUDIO'}}`): so does this, for small bodies that are literals."""
    body = await _read_body(request, MAX_START_BODY_BYTES, "The upload's metadata")
    if not body.strip():
        return {}
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # ValueError: bad JSON, bad UTF-8, an integer of thousands of digits
        pass
    try:
        value = ast.literal_eval(body.decode())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise invalid_argument("The upload's metadata is not valid JSON.", "file") from None
    if not isinstance(value, dict):
        raise invalid_argument("The upload's metadata must be a JSON object.", "file")
    return value


async def _read_body(request: Request, limit: int, what: str) -> bytes:
    """A whole (small) body, refused past `limit` bytes or when it stops arriving."""
    body = bytearray()
    stream = request.stream()
    while (chunk := await next_chunk(stream, CHUNK_TIMEOUT_SECONDS, "The request body stopped arriving for "
                                     f"{CHUNK_TIMEOUT_SECONDS} seconds; the request was dropped.")) is not None:
        body += chunk
        if len(body) > limit:
            raise invalid_argument(f"{what} may have at most {limit} bytes.", "file")
    return bytes(body)


async def _multipart(request: Request, files: Files, who: Caller) -> dict[str, Any]:
    """A multipart/related upload: metadata (JSON), then the bytes."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/"):
        raise invalid_argument("Content-Type: a multipart upload is sent as multipart/related.", "Content-Type")
    body = await _read_body(request, MAX_MULTIPART_BYTES, "A multipart upload (send larger files with the "
                                                           "resumable protocol)")
    message = await asyncio.to_thread(
        BytesParser(policy=HTTP).parsebytes, f"Content-Type: {content_type}\r\n\r\n".encode() + bytes(body))
    parts = list(message.iter_parts()) if message.is_multipart() else []
    if len(parts) != 2:
        raise invalid_argument("A multipart upload has two parts: the metadata (JSON), then the file's bytes.",
                               "file")
    try:
        raw = parts[0].get_payload(decode=True)
        metadata = json.loads(raw if isinstance(raw, bytes) and raw.strip() else b"{}")
    except (ValueError, RecursionError):
        raise invalid_argument("The upload's metadata is not valid JSON.", "file") from None
    data = parts[1].get_payload(decode=True) or b""
    mime = parts[1].get_content_type() if parts[1].get("content-type") else None
    new_id = await files.start_upload(who, metadata, str(len(data)), mime)

    async def one_chunk() -> AsyncIterator[bytes]:
        yield bytes(data)

    try:
        status = await files.put(new_id, 0, one_chunk(), True, base_url(request))
    except BaseException:
        await files.cancel_upload(new_id)
        raise
    return {"file": status.file}


@router.post("/{version}/files")
async def create_without_bytes(version: str, request: Request, _: CallerDep) -> dict[str, Any]:
    check_version(version)
    await read_json(request)
    raise invalid_argument("A file is created by uploading its bytes: POST them to /upload/v1beta/files.", "file")


@router.get("/{version}/files")
async def list_files(version: str, request: Request, who: CallerDep, pageSize: int | None = None,  # noqa: N803
                     pageToken: str | None = None) -> dict[str, Any]:  # noqa: N803
    check_version(version)
    return await files_of(request).list(who, pageSize, pageToken, base_url(request))


@router.get("/{version}/files/{file_id}")
async def get_file(version: str, file_id: str, request: Request, who: CallerDep) -> dict[str, Any]:
    check_version(version)
    if ":" in file_id:
        raise url_not_found()
    return await files_of(request).get(who, file_id, base_url(request))


@router.delete("/{version}/files/{file_id}")
async def delete_file(version: str, file_id: str, request: Request, who: CallerDep) -> dict[str, Any]:
    check_version(version)
    if ":" in file_id:
        raise url_not_found()
    await files_of(request).delete(who, file_id)
    return {}



@router.get("/$discovery/rest")
async def discovery(request: Request) -> dict[str, Any]:
    """The part of Google's discovery document that google-generativeai reads before each `upload_file` (it
    fetches the document from a fixed URL: point `google.generativeai.client.GENAI_API_DISCOVERY_URL` here)."""
    root = base_url(request) + "/"
    file_schema = {"id": "File", "type": "object", "properties": {"name": {"type": "string"},
                                                                    "displayName": {"type": "string"}}}
    return {
        "kind": "discovery#restDescription", "discoveryVersion": "v1", "id": "generativelanguage:v1beta",
        "name": "generativelanguage", "version": "v1beta", "protocol": "rest",
        "rootUrl": root, "baseUrl": root, "servicePath": "", "batchPath": "batch",
        "parameters": {"key": {"type": "string", "location": "query"},
                       "alt": {"type": "string", "location": "query", "default": "json",
                               "enum": ["json", "media", "proto"]}},
        "schemas": {
            "File": file_schema,
            "CreateFileRequest": {"id": "CreateFileRequest", "type": "object",
                                  "properties": {"file": {"$ref": "File"}}},
            "CreateFileResponse": {"id": "CreateFileResponse", "type": "object",
                                   "properties": {"file": {"$ref": "File"}}},
        },
        "resources": {"media": {"methods": {"upload": {
            "id": "generativelanguage.media.upload", "path": "v1beta/files", "flatPath": "v1beta/files",
            "httpMethod": "POST", "parameters": {}, "parameterOrder": [],
            "request": {"$ref": "CreateFileRequest"}, "response": {"$ref": "CreateFileResponse"},
            "supportsMediaUpload": True,
            "mediaUpload": {"accept": ["*/*"], "maxSize": "2147483648", "protocols": {
                "simple": {"multipart": True, "path": "/upload/v1beta/files"},
                "resumable": {"multipart": True, "path": "/resumable/upload/v1beta/files"}}},
        }}}},
    }
