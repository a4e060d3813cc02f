"""The Files API: uploads (resumable, multipart or plain), get, list, delete, and processing into renderings.

A file belongs to the key that uploaded it (others get 403, as for a missing file; ids are per key, so a taken
id tells nothing).
Its bytes are written to a partial file as they arrive; the file exists - has a record - only once they are
complete, their size matches what was declared, and its type is checked against them (`media.kinds`). It is then
PROCESSING until `media.render` has made what a model reads of it (text of a PDF's pages, a transcript with
times, the text in an image and what it shows), which is kept with the record: ACTIVE, or FAILED with the reason.
Processing runs in a bounded pool, off the event loop, once per file; a restart processes again what was pending.

Uploads follow Google's resumable protocol: `start` (metadata, declared size and type) answers with an upload
URL whose id is the credential (chunks carry no API key); chunks are POSTed there at `X-Goog-Upload-Offset`,
`query` tells how much was stored, `finalize` completes it. An upload or a file expires after 48 hours with its
bytes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gemserve.bodies import next_chunk
from gemserve.errors import ApiError, invalid_argument, not_found
from gemserve.identity import Caller
from gemserve.media import kinds
from gemserve.media.processor import MediaProcessor
from gemserve.media.rendering import MediaError, Rendering
from gemserve.service import paging
from gemserve.store.files import FileRecord, FileStore, UploadRecord
from gemserve.timestamps import parse_rfc3339, rfc3339, utc_now

log = logging.getLogger("gemserve.files")

LIFETIME = timedelta(hours=48)
MAX_FILE_BYTES = 2 * 1024**3
MAX_BYTES_PER_KEY = 20 * 1024**3
DEFAULT_PAGE_SIZE = 10
MAX_PAGE_SIZE = 100
MAX_DISPLAY_NAME = 512
CHUNK_TIMEOUT_SECONDS = 30
FINALIZE_WAIT_SECONDS = 60  # the last chunk's answer waits this long for processing (not for videos)
ORPHAN_SECONDS = 3600  # bytes without a record go once they are this old
USE_WAIT_SECONDS = 600  # a request naming a file still processing waits this long for it
FILE_ID = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?")


def file_id_of(name: str, field: str = "name") -> str:
    """`files/abc` or `abc` -> `abc`; a 400 naming `field` for anything that is not a file id."""
    file_id = name.removeprefix("files/")
    if not FILE_ID.fullmatch(file_id):
        raise invalid_argument(f"{field}: {name!r} is not a valid file name: it must look like files/abc-123, "
                               "with at most 40 lowercase letters, digits or dashes (not first or last).", field)
    return file_id


def missing(file_id: str) -> ApiError:
    return ApiError("PERMISSION_DENIED", f"You do not have permission to access the File {file_id} or it may not "
                    "exist.")


class UploadStatus:
    """What a chunk request answers: the upload goes on (`file` None) or is complete."""

    def __init__(self, received: int, file: dict[str, Any] | None = None) -> None:
        self.received = received
        self.file = file


class Files:
    def __init__(self, store: FileStore, processor: MediaProcessor) -> None:
        self._store = store
        self._processor = processor
        self._locks: dict[str, asyncio.Lock] = {}  # one request at a time per upload
        self._processing: dict[tuple[str, str], asyncio.Task[None]] = {}

    # ---- the resource -------------------------------------------------------------------------------------

    def resource(self, record: FileRecord, base_url: str) -> dict[str, Any]:
        """The File as Google's, and, while it is PROCESSING, gemserve's `processingProgress` (the clients skip
        fields they do not know)."""
        body: dict[str, Any] = {"name": f"files/{record.id}"}
        if record.display_name:
            body["displayName"] = record.display_name
        body.update({
            "mimeType": record.mime_type,
            "sizeBytes": str(record.size_bytes),
            "createTime": record.create_time,
            "updateTime": record.update_time,
            "expirationTime": record.expire_time,
            # As Google's: the base64 of the hex digest.
            "sha256Hash": base64.b64encode(record.sha256.encode()).decode(),
            "uri": f"{base_url.rstrip('/')}/v1beta/files/{record.id}",
            "state": record.state,
            "source": "UPLOADED",
        })
        if record.error is not None:
            body["error"] = record.error
        now = self._processor.progress((record.owner, record.id)) if record.state == "PROCESSING" else None
        if now is not None:
            body["processingProgress"] = {"fraction": round(now.done, 3), "step": now.step}
        duration = (record.rendering or {}).get("duration")
        if record.state == "ACTIVE" and kinds.kind_of(record.mime_type) == "video" and duration is not None:
            body["videoMetadata"] = {"videoDuration": f"{duration:.3f}".rstrip("0").rstrip(".") + "s"}
        return body

    async def get(self, caller: Caller, name: str, base_url: str) -> dict[str, Any]:
        return self.resource(await self._owned(caller, file_id_of(name)), base_url)

    async def list(self, caller: Caller, page_size: int | None, page_token: str | None,
                   base_url: str) -> dict[str, Any]:
        size = page_size or DEFAULT_PAGE_SIZE
        if size < 0:
            raise invalid_argument("page_size must not be negative.", "page_size")
        size = min(size, MAX_PAGE_SIZE)
        offset = paging.page_offset(page_token, "files") if page_token else 0
        now = utc_now()
        records = await asyncio.to_thread(self._store.page, caller.owner, offset, size + 1)
        page: dict[str, Any] = {"files": [self.resource(r, base_url) for r in records[:size] if r.expire_time > now]}
        if len(records) > size:
            page["nextPageToken"] = paging.page_token("files", offset + size)
        return page

    async def delete(self, caller: Caller, name: str) -> None:
        file_id = file_id_of(name)
        await self._owned(caller, file_id)
        task = self._processing.pop((caller.owner, file_id), None)
        if task is not None:
            task.cancel()
        await asyncio.to_thread(self._remove, caller.owner, file_id)
        log.info("file deleted", extra={"file": file_id})

    async def usable(self, caller: Caller, file_id: str) -> tuple[FileRecord, Rendering]:
        """An ACTIVE file of the caller's and its rendering, for a request's fileData."""
        record = await asyncio.to_thread(self._store.get, caller.owner, file_id)
        if record is not None and record.state == "PROCESSING":  # Google's are ready at once, but for videos
            await self._processed(record, USE_WAIT_SECONDS)
            record = await asyncio.to_thread(self._store.get, caller.owner, file_id)
        if record is None or _expired(record):
            raise missing(file_id)
        if record.state == "PROCESSING":
            raise ApiError("FAILED_PRECONDITION", f"The File {file_id} is not in an ACTIVE state and usage is not "
                           "allowed.")
        if record.state == "ACTIVE" and record.rendering is None:
            raise invalid_argument(f"Unsupported MIME type: {record.mime_type} (files/{file_id})", "file_data")
        if record.state == "FAILED" or record.rendering is None:
            reason = (record.error or {}).get("message", "its processing failed")
            raise ApiError("FAILED_PRECONDITION", f"The File {file_id} cannot be used: {reason}")
        return record, Rendering.from_json(record.rendering)

    async def _owned(self, caller: Caller, file_id: str) -> FileRecord:
        record = await asyncio.to_thread(self._store.get, caller.owner, file_id)
        if record is None or _expired(record):
            raise missing(file_id)
        return record

    # ---- uploads ------------------------------------------------------------------------------------------

    async def start_upload(self, caller: Caller, metadata: Any, size: str | None, mime_type: str | None) -> str:
        """A new upload's id, from the start request's `{"file": {...}}` and its X-Goog-Upload-Header-*."""
        file_meta = _file_metadata(metadata)
        declared = None
        if size:
            if not re.fullmatch(r"[0-9]{1,19}", size.strip()):
                raise invalid_argument(f"X-Goog-Upload-Header-Content-Length: {size!r} is not a byte count.",
                                       "X-Goog-Upload-Header-Content-Length")
            declared = int(size)
            _check_size(declared)
        mime = (mime_type or file_meta.get("mimeType") or "").split(";")[0].strip().lower()
        if not mime:
            raise invalid_argument("Missing MIME type: set X-Goog-Upload-Header-Content-Type (or file.mimeType).",
                                   "file.mime_type")
        if not kinds.valid_mime_type(mime):
            raise invalid_argument(f"file.mime_type: {mime!r} is not a MIME type.", "file.mime_type")
        display_name = str(file_meta.get("displayName") or "")
        if len(display_name) > MAX_DISPLAY_NAME:
            raise invalid_argument(f"file.display_name: must be at most {MAX_DISPLAY_NAME} characters.",
                                   "file.display_name")
        name = file_meta.get("name")
        file_id = file_id_of(str(name), "file.name") if name else _new_id()
        if name and (await asyncio.to_thread(self._store.get, caller.owner, file_id) is not None or
                     await asyncio.to_thread(self._store.uploading, caller.owner, file_id)):
            raise ApiError("ALREADY_EXISTS", f"A file named files/{file_id} already exists.")
        used = await asyncio.to_thread(self._store.total_bytes, caller.owner)
        if declared is not None and used + declared > MAX_BYTES_PER_KEY:
            raise _over_quota(used)
        upload = UploadRecord(id=secrets.token_urlsafe(32), owner=caller.owner, file_id=file_id, mime_type=mime,
                              expire_time=rfc3339(datetime.now(UTC) + LIFETIME), display_name=display_name,
                              size_bytes=declared)
        await asyncio.to_thread(self._start, upload)
        log.info("upload started", extra={"file": file_id, "bytes": declared})
        return upload.id

    def _start(self, upload: UploadRecord) -> None:
        self._store.uploads_dir.mkdir(parents=True, exist_ok=True)
        self._store.partial(upload.id).touch()
        self._store.start_upload(upload)

    async def query(self, upload_id: str) -> int:
        return (await self._upload(upload_id)).received

    async def put(self, upload_id: str, offset: int | None, body: AsyncIterator[bytes], finalize: bool,
                  base_url: str, total: int | None = None) -> UploadStatus:
        """Store a chunk at `offset` (it must be where the stored bytes end), and complete the upload when
        `finalize`. Bytes beyond what was declared, or a chunk that stops arriving, fail the chunk only."""
        await self._upload(upload_id)  # an unknown id leaves nothing behind, not even a lock
        async with self._locks.setdefault(upload_id, asyncio.Lock()):
            upload = await self._upload(upload_id)
            if offset is not None and offset != upload.received:
                raise invalid_argument(f"X-Goog-Upload-Offset: {offset} is not where the upload stands: "
                                       f"{upload.received} bytes were received (ask with X-Goog-Upload-Command: "
                                       "query).", "X-Goog-Upload-Offset")
            received = await self._append(upload, body)
            if not finalize:
                return UploadStatus(received)
            if total is not None and received != total:
                raise invalid_argument(f"The upload was finalized with {received} bytes, but its Content-Range says "
                                       f"{total}.", "Content-Range")
            record = await self._complete(upload, received)
        self._locks.pop(upload_id, None)
        self._schedule(record)
        # Google's files are ACTIVE when the upload ends (but videos): most are ready here within a few seconds.
        if kinds.kind_of(record.mime_type) != "video" and await self._processed(record, FINALIZE_WAIT_SECONDS):
            processed = await asyncio.to_thread(self._store.get, record.owner, record.id)
            record = processed or record
        return UploadStatus(record.size_bytes, self.resource(record, base_url))

    async def _upload(self, upload_id: str) -> UploadRecord:
        upload = await asyncio.to_thread(self._store.upload, upload_id)
        if upload is None or upload.expire_time <= utc_now():
            raise not_found("The upload was not found: it was completed, cancelled or expired. Start a new one.")
        return upload

    async def _append(self, upload: UploadRecord, body: AsyncIterator[bytes]) -> int:
        limit = upload.size_bytes if upload.size_bytes is not None else MAX_FILE_BYTES
        quota = MAX_BYTES_PER_KEY - await asyncio.to_thread(self._store.total_bytes, upload.owner) + upload.received
        path = self._store.partial(upload.id)
        received = upload.received
        handle = await asyncio.to_thread(_open_at, path, received)
        stored = received
        try:
            pending: list[bytes] = []
            size = 0
            while True:
                chunk = await next_chunk(body, CHUNK_TIMEOUT_SECONDS, f"The upload's bytes stopped arriving for "
                                         f"{CHUNK_TIMEOUT_SECONDS} seconds; the chunk was dropped (send it again "
                                         "from the offset that query reports).")
                if chunk is None:
                    break
                if received + size + len(chunk) > limit:
                    raise invalid_argument(f"The upload is larger than the {limit} bytes it declared (or the limit of "
                                           f"{MAX_FILE_BYTES} bytes a file).", "X-Goog-Upload-Header-Content-Length")
                if received + size + len(chunk) > quota:
                    raise _over_quota(MAX_BYTES_PER_KEY)
                pending.append(chunk)
                size += len(chunk)
                if size >= 1 << 20:  # written a megabyte at a time, off the loop
                    await asyncio.to_thread(handle.write, b"".join(pending))
                    received, pending, size = received + size, [], 0
            if pending:
                await asyncio.to_thread(handle.write, b"".join(pending))
                received += size
            await asyncio.to_thread(_sync, handle)
        except BaseException:  # a chunk cut off counts for nothing: its bytes go at once, not in 48 hours
            await asyncio.shield(asyncio.to_thread(handle.truncate, stored))
            raise
        finally:
            await asyncio.shield(asyncio.to_thread(handle.close))
        # Only bytes of a chunk that arrived whole count: a chunk cut off is sent again from the same offset.
        await asyncio.to_thread(self._store.set_received, upload.id, received)
        return received

    async def _complete(self, upload: UploadRecord, received: int) -> FileRecord:
        if upload.size_bytes is not None and received != upload.size_bytes:
            raise invalid_argument(f"The upload was finalized with {received} bytes, but it declared "
                                   f"{upload.size_bytes}.", "X-Goog-Upload-Header-Content-Length")
        if received == 0:
            raise invalid_argument("The file is empty.", "file")
        path = self._store.partial(upload.id)
        digest, head = await asyncio.to_thread(_digest, path)
        problem = kinds.mismatch(upload.mime_type, head)
        if problem is not None:
            await asyncio.to_thread(self._abandon, upload.id)
            raise invalid_argument(f"file.mime_type: {problem}", "file.mime_type")
        now = datetime.now(UTC)
        record = FileRecord(id=upload.file_id, owner=upload.owner, mime_type=upload.mime_type, size_bytes=received,
                            sha256=digest, create_time=rfc3339(now), update_time=rfc3339(now),
                            expire_time=rfc3339(now + LIFETIME), state="PROCESSING",
                            display_name=upload.display_name)
        await asyncio.to_thread(self._move_in, upload.id, record)
        log.info("file uploaded", extra={"file": record.id, "bytes": received, "mime_type": record.mime_type})
        return record

    def _move_in(self, upload_id: str, record: FileRecord) -> None:
        """The bytes to their place, then the record in: a file is never seen without its bytes."""
        if self._store.get(record.owner, record.id) is not None:
            self._abandon(upload_id)
            raise ApiError("ALREADY_EXISTS", f"A file named files/{record.id} already exists.")
        record.blob = upload_id
        partial, blob = self._store.partial(upload_id), self._store.blob(record)
        blob.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, blob)
        try:
            if not self._store.finish_upload(upload_id, record):
                raise ApiError("ALREADY_EXISTS", f"A file named files/{record.id} already exists.")
        except BaseException:
            os.replace(blob, partial)  # the upload is as it was: finalizing may be tried again
            raise

    async def cancel_upload(self, upload_id: str) -> None:
        """A one-request upload (plain or multipart) that failed: nothing of it stays."""
        await asyncio.shield(asyncio.to_thread(self._abandon, upload_id))

    def _abandon(self, upload_id: str) -> None:
        self._store.drop_upload(upload_id)
        self._store.partial(upload_id).unlink(missing_ok=True)

    # ---- processing ---------------------------------------------------------------------------------------

    def _schedule(self, record: FileRecord) -> None:
        key = (record.owner, record.id)
        task = asyncio.create_task(self._process(record))
        self._processing[key] = task
        task.add_done_callback(lambda done: self._processing.pop(key) if self._processing.get(key) is done else None)

    async def _processed(self, record: FileRecord, seconds: float) -> bool:
        """Wait (at most `seconds`) for the file's processing; False if it is still going on."""
        task = self._processing.get((record.owner, record.id))
        if task is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(task), seconds)
        except TimeoutError:
            return False
        return True

    async def _process(self, record: FileRecord) -> None:
        blob = self._store.blob(record)
        rendering: Rendering | None = None
        error: dict[str, Any] | None = None
        try:
            if kinds.kind_of(record.mime_type) is None:  # stored as given; a request that uses it is told so
                kept = await asyncio.to_thread(self._store.set_processed, record, "ACTIVE", utc_now(), None, None)
                log.info("file stored", extra={"file": record.id, "kept": kept})
                return
            rendering = await self._processor.render_file(blob, record.mime_type, record.display_name or record.id,
                                                          record.owner, job=(record.owner, record.id))
        except MediaError as exc:
            error = {"code": 400, "message": str(exc), "status": "INVALID_ARGUMENT"}
        except Exception:
            log.exception("file processing failed", extra={"file": record.id})
            error = {"code": 500, "message": "The file could not be processed.", "status": "INTERNAL"}
        state = "ACTIVE" if rendering is not None else "FAILED"
        try:
            kept = await asyncio.to_thread(self._store.set_processed, record, state, utc_now(),
                                           None if rendering is None else rendering.to_json(), error)
        except Exception:
            log.exception("the result of processing could not be stored", extra={"file": record.id})
            return
        log.info("file processed", extra={"file": record.id, "state": state, "kept": kept})

    async def resume(self) -> None:
        """At start-up: process again what was pending when the server stopped."""
        for record in await asyncio.to_thread(self._store.with_state, "PROCESSING"):
            self._schedule(record)

    async def close(self) -> None:
        tasks = list(self._processing.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- expiry -------------------------------------------------------------------------------------------

    async def sweep(self) -> None:
        await asyncio.to_thread(self._sweep)

    def _sweep(self) -> None:
        now = utc_now()
        for owner, file_id in self._store.expired(now):
            self._remove(owner, file_id)
        for upload_id in self._store.expired_uploads(now):
            self._abandon(upload_id)
            self._locks.pop(upload_id, None)
        # Bytes without a record: a crash between writing them and recording them, or an expired upload's.
        # Only old ones: a file being moved in or an upload just started has bytes before its record shows.
        settled = time.time() - ORPHAN_SECONDS
        live_uploads = self._store.upload_ids()
        if self._store.uploads_dir.is_dir():
            for path in self._store.uploads_dir.iterdir():
                if path.name not in live_uploads and _older(path, settled):
                    path.unlink(missing_ok=True)
        live = self._store.all_blobs()
        if self._store.files_dir.is_dir():
            for owner_dir in self._store.files_dir.iterdir():
                for path in owner_dir.iterdir():
                    if (owner_dir.name, path.name) not in live and _older(path, settled):
                        path.unlink(missing_ok=True)

    def _remove(self, owner: str, file_id: str) -> None:
        record = self._store.delete(owner, file_id)
        if record is not None:
            self._store.blob(record).unlink(missing_ok=True)


def _file_metadata(metadata: Any) -> dict[str, Any]:
    """The `file` object of a start or multipart metadata body, with snake_case names made camelCase."""
    if metadata is None or metadata == {}:
        return {}
    if not isinstance(metadata, dict):
        raise invalid_argument("The request body must be a JSON object such as {\"file\": {\"displayName\": "
                               "\"...\"}}.", "file")
    extra = sorted(str(key) for key in metadata if key != "file")
    if extra:
        raise invalid_argument(f'Invalid JSON payload received. Unknown name "{extra[0]}": Cannot find field.',
                               extra[0])
    file = metadata.get("file") or {}
    if not isinstance(file, dict):
        raise invalid_argument("file: must be an object.", "file")
    known = {"name", "displayName", "mimeType", "sizeBytes", "createTime", "updateTime", "expirationTime",
             "sha256Hash", "uri", "downloadUri", "state", "source", "error", "videoMetadata"}
    out: dict[str, Any] = {}
    for key, value in file.items():
        if not isinstance(key, str):
            raise invalid_argument(f"file: {key!r} is not a field name.", "file")
        camel = re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), key)
        if camel not in known:
            raise invalid_argument(f'Invalid JSON payload received. Unknown name "{key}" at \'file\': Cannot find '
                                   "field.", f"file.{key}")
        if value is not None and camel in ("name", "displayName", "mimeType") and not isinstance(value, str):
            raise invalid_argument(f"file.{key}: must be a string.", f"file.{key}")
        out[camel] = value
    return out


def _older(path: Path, moment: float) -> bool:
    try:
        return path.stat().st_mtime < moment
    except FileNotFoundError:
        return False


def _check_size(size: int) -> None:
    if size > MAX_FILE_BYTES:
        raise invalid_argument(f"The file is {size} bytes; a file may have at most {MAX_FILE_BYTES} bytes (2 GB).",
                               "X-Goog-Upload-Header-Content-Length")


def _over_quota(used: int) -> ApiError:
    return ApiError("RESOURCE_EXHAUSTED", f"Files of this API key would exceed {MAX_BYTES_PER_KEY} bytes (20 GB) "
                    f"in all ({used} bytes are used); delete some files first.")


def _new_id() -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(12))


def _expired(record: FileRecord) -> bool:
    return parse_rfc3339(record.expire_time) <= datetime.now(UTC)


def _open_at(path: Path, offset: int) -> Any:
    """The partial file opened for appending at `offset`: bytes of a chunk cut off before they were counted go."""
    handle = path.open("r+b")
    handle.truncate(offset)
    handle.seek(offset)
    return handle


def _sync(handle: Any) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def _digest(path: Path) -> tuple[str, bytes]:
    """(sha256 hex, the first bytes), read once."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        head = handle.read(kinds.SNIFF_BYTES)
        digest.update(head)
        shutil.copyfileobj(handle, _Hasher(digest), 1 << 20)
    return digest.hexdigest(), head


class _Hasher:
    def __init__(self, digest: Any) -> None:
        self._digest = digest

    def write(self, data: bytes) -> None:
        self._digest.update(data)
