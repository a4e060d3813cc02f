"""Media parts of a request: every inlineData and fileData part gets its rendering before the conversation is built.

inlineData is decoded, its type checked against its bytes, and rendered in the media pool (the same bytes again,
as a chat sends them turn after turn, are rendered once: `MediaProcessor` keeps recent renderings). fileData
names a file of this server - `files/{id}` or the `uri` the Files API gave - which must be the caller's and
ACTIVE; its rendering was made when it was uploaded (a request for a file still processing waits for it).
A model's own turns may carry figures that code made (code execution): those stay out of the prompt.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from gemserve.errors import invalid_argument
from gemserve.identity import Caller
from gemserve.media import kinds
from gemserve.media.processor import MediaProcessor
from gemserve.media.rendering import MediaError, Rendering
from gemserve.schema.content import Blob, FileData, GenerateContentRequest, Part
from gemserve.service.files import FILE_ID, Files

_FILE_PATH = re.compile(r"/(?:v1beta|v1)/files/(?P<id>[^/?#]+)")
MAX_MEDIA_PARTS = 100
_URL_SAFE = str.maketrans("-_", "+/")


async def attach_media(request: GenerateContentRequest, caller: Caller, files: Files, processor: MediaProcessor,
                       host: str) -> None:
    """Set the rendering of every media part of `request` (`host`: the Host the request was addressed to, which
    a file URI must name)."""
    parts = list(_media_parts(request))
    if len(parts) > MAX_MEDIA_PARTS:
        raise invalid_argument(f"contents: a request may have at most {MAX_MEDIA_PARTS} media parts, this one has "
                               f"{len(parts)}.", "contents")
    for where, part in parts:
        if part.inline_data is not None:
            part._rendering = await _inline(part.inline_data, f"{where}.inline_data", caller, processor)
        elif part.file_data is not None:
            part._rendering = await _file(part.file_data, f"{where}.file_data", caller, files, host)


def renderings_of(request: GenerateContentRequest) -> list[list[Any]]:
    """The renderings set on `request`'s parts, as `[content index, part index, rendering]` to keep as JSON."""
    return [[i, j, part.rendering.to_json()] for i, content in enumerate(request.contents)
            for j, part in enumerate(content.parts) if part.rendering is not None]


def restore_renderings(request: GenerateContentRequest, kept: list[list[Any]]) -> None:
    for i, j, rendering in kept:
        request.contents[i].parts[j]._rendering = Rendering.from_json(rendering)


def _media_parts(request: GenerateContentRequest) -> Iterator[tuple[str, Part]]:
    for i, content in enumerate(request.contents):
        for j, part in enumerate(content.parts):
            if part.rendering is not None or (part.inline_data is not None and content.role == "model"):
                continue  # rendered already (a cached content's), or a figure code made, sent back with the chat
            if part.inline_data is not None or part.file_data is not None:
                yield f"contents[{i}].parts[{j}]", part


async def _inline(blob: Blob, field: str, caller: Caller, processor: MediaProcessor) -> Rendering:
    mime = _mime(blob.mime_type, field)
    try:  # Google accepts the URL-safe alphabet too
        text = (blob.data or "").translate(_URL_SAFE)
        data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)  # padding is optional, as in proto3
    except (binascii.Error, ValueError):
        raise invalid_argument(f"{field}.data: Invalid value (bytes): not valid base64.", f"{field}.data") from None
    if not data:
        raise invalid_argument(f"{field}.data: the inline data is empty.", f"{field}.data")
    problem = kinds.mismatch(mime, data[: kinds.SNIFF_BYTES])
    if problem is not None:
        raise invalid_argument(f"{field}.mime_type: {problem}", f"{field}.mime_type")
    try:
        return await processor.render_bytes(data, mime, blob.display_name or "inline data", caller.owner)
    except MediaError as exc:
        raise invalid_argument(f"{field}: {exc}", field) from None


def _mime(mime_type: str | None, field: str) -> str:
    mime = (mime_type or "").split(";")[0].strip().lower()
    if not mime:
        raise invalid_argument(f"{field}.mime_type: the MIME type is required.", f"{field}.mime_type")
    if kinds.kind_of(mime) is None:
        raise invalid_argument(f"{field}.mime_type: Unsupported MIME type: {mime}", f"{field}.mime_type")
    return mime


async def _file(data: FileData, field: str, caller: Caller, files: Files, host: str) -> Rendering:
    uri = (data.file_uri or "").strip()
    if not uri:
        raise invalid_argument(f"{field}.file_uri: the file's URI is required.", f"{field}.file_uri")
    file_id = _file_id(uri, host)
    if file_id is None:
        raise invalid_argument(f"{field}.file_uri: {uri!r} is not a file of this server: upload the file with the "
                               "Files API here and use the uri it returns (or files/{id}).", f"{field}.file_uri")
    record, rendering = await files.usable(caller, file_id)
    if kinds.kind_of(record.mime_type) is None:
        raise invalid_argument(f"{field}: Unsupported MIME type: {record.mime_type}", field)
    return rendering


def _file_id(uri: str, host: str) -> str | None:
    if uri.startswith("files/"):
        file_id = uri.removeprefix("files/")
        return file_id if FILE_ID.fullmatch(file_id) else None
    parts = urlsplit(uri)
    match = _FILE_PATH.fullmatch(parts.path)
    if parts.scheme not in ("http", "https") or match is None or not FILE_ID.fullmatch(match.group("id")):
        return None
    if not _same_host(parts.hostname or "", host):
        return None
    return match.group("id")


def _same_host(named: str, host: str) -> bool:
    """Whether a URI's host names this server: the Host the request came to, or both loopback."""
    ours = (urlsplit(f"//{host}").hostname or "").lower()
    if named.lower() == ours:
        return True
    return _loopback(named) and _loopback(ours)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
