"""The Files API in process: resumable, googleapiclient, multipart and plain uploads; get, list, delete; keys kept
apart; types checked against bytes; failed processing; expiry; processing resumed after a restart. Readers are
scripted, so this runs without any model."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from gemserve.api import files as files_routes
from gemserve.api.errors import install_error_handlers
from gemserve.config import Settings
from gemserve.errors import ApiError
from gemserve.identity import Identities
from gemserve.media.processor import MediaProcessor
from gemserve.service import files as files_service
from gemserve.service.files import Files
from gemserve.store.db import Database
from gemserve.store.files import FileStore
from tests.media.samples import HeldReaders, ScriptedReaders, text_pdf, text_picture

KEY, OTHER = "key-one", "key-two"
PDF = text_pdf(["The password is pineapple."])


def make_app(data_dir: Path, readers: ScriptedReaders | None = None) -> FastAPI:
    app = FastAPI()
    app.state.settings = Settings(data_dir=data_dir, api_keys=frozenset({KEY, OTHER}))
    app.state.identities = Identities(b"s" * 32)
    processor = MediaProcessor(data_dir, readers=readers or ScriptedReaders())  # type: ignore[arg-type]
    app.state.files = Files(FileStore(Database(data_dir / "gemserve.db"), data_dir), processor)
    install_error_handlers(app)
    app.include_router(files_routes.router)
    return app


Scenario = Callable[[httpx.AsyncClient, FastAPI], Awaitable[None]]


def drive(tmp_path: Path, scenario: Scenario, readers: ScriptedReaders | None = None) -> None:
    app = make_app(tmp_path, readers)

    async def go() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8080") as client:
            await scenario(client, app)
        await app.state.files.close()
        app.state.files._processor.close()

    asyncio.run(go())


def keyed(key: str = KEY, **headers: str) -> dict[str, str]:
    return {"x-goog-api-key": key, **headers}


async def start(client: httpx.AsyncClient, size: int, mime: str, body: Any = None, key: str = KEY) -> str:
    answer = await client.post("/upload/v1beta/files", json=body or {"file": {"display_name": "doc"}},
                               headers=keyed(key, **{"X-Goog-Upload-Protocol": "resumable",
                                                     "X-Goog-Upload-Command": "start",
                                                     "X-Goog-Upload-Header-Content-Length": str(size),
                                                     "X-Goog-Upload-Header-Content-Type": mime}))
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-goog-upload-status"] == "active"
    url = answer.headers["x-goog-upload-url"]
    assert url.startswith("http://127.0.0.1:8080/upload/v1beta/files?upload_id=")
    return url


async def chunk(client: httpx.AsyncClient, url: str, data: bytes, offset: int, command: str) -> httpx.Response:
    return await client.post(url, content=data, headers={"X-Goog-Upload-Command": command,
                                                         "X-Goog-Upload-Offset": str(offset)})


def test_a_resumable_upload_in_chunks_then_get_list_delete(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, app: FastAPI) -> None:
        url = await start(client, len(PDF), "application/pdf")
        first = await chunk(client, url, PDF[:300], 0, "upload")  # no key on chunks: the upload id is the credential
        assert first.status_code == 200 and first.headers["x-goog-upload-status"] == "active"
        query = await client.post(url, headers={"X-Goog-Upload-Command": "query"})
        assert query.headers["x-goog-upload-size-received"] == "300"
        last = await chunk(client, url, PDF[300:], 300, "upload, finalize")
        assert last.status_code == 200 and last.headers["x-goog-upload-status"] == "final"
        file = last.json()["file"]
        assert file["name"].startswith("files/") and file["displayName"] == "doc"
        assert file["mimeType"] == "application/pdf" and file["sizeBytes"] == str(len(PDF))
        assert file["state"] == "ACTIVE" and file["source"] == "UPLOADED"
        assert base64.b64decode(file["sha256Hash"]).decode() == hashlib.sha256(PDF).hexdigest()
        assert file["uri"] == f"http://127.0.0.1:8080/v1beta/files/{file['name'][6:]}"
        assert file["createTime"] < file["expirationTime"]

        got = await client.get(f"/v1/{file['name']}", headers=keyed())
        assert got.json()["state"] == "ACTIVE" and got.json()["sha256Hash"] == file["sha256Hash"]
        listed = await client.get("/v1beta/files", headers=keyed())
        assert [f["name"] for f in listed.json()["files"]] == [file["name"]]
        record, rendering = await app.state.files.usable(app.state.identities.caller_for_key(KEY), file["name"][6:])
        assert "The password is pineapple." in rendering.text and record.size_bytes == len(PDF)

        for other in (await client.get(f"/v1beta/{file['name']}", headers=keyed(OTHER)),
                      await client.delete(f"/v1beta/{file['name']}", headers=keyed(OTHER))):
            assert other.status_code == 403 and "may not exist" in other.json()["error"]["message"]
        assert (await client.get("/v1beta/files", headers=keyed(OTHER))).json() == {"files": []}

        assert (await client.delete(f"/v1beta/{file['name']}", headers=keyed())).json() == {}
        assert (await client.get(f"/v1beta/{file['name']}", headers=keyed())).status_code == 403
        assert not [p for p in (tmp_path / "files").rglob("*") if p.is_file()]

    drive(tmp_path, scenario)


def test_an_interrupted_upload_resumes_from_what_was_stored(tmp_path: Path) -> None:
    data = b"line of text\n" * 5000

    async def scenario(client: httpx.AsyncClient, _: FastAPI) -> None:
        url = await start(client, len(data), "text/plain")
        assert (await chunk(client, url, data[:20000], 0, "upload")).status_code == 200
        wrong = await chunk(client, url, data[30000:], 30000, "upload, finalize")  # a chunk went missing
        assert wrong.status_code == 400 and wrong.headers["x-goog-upload-status"] == "final"
        assert "20000 bytes were received" in wrong.json()["error"]["message"]
        received = int((await client.post(url, headers={"X-Goog-Upload-Command": "query"}))
                       .headers["x-goog-upload-size-received"])
        done = await chunk(client, url, data[received:], received, "upload, finalize")
        assert done.json()["file"]["sizeBytes"] == str(len(data)) and done.json()["file"]["state"] == "ACTIVE"
        again = await chunk(client, url, b"x", len(data), "upload")  # the upload is over
        assert again.status_code == 404 and again.headers["x-goog-upload-status"] == "final"

    drive(tmp_path, scenario)


def test_the_googleapiclient_protocol(tmp_path: Path) -> None:
    """google-generativeai's upload_file: a Location, PUTs with Content-Range, 308 until the last one."""
    async def scenario(client: httpx.AsyncClient, _: FastAPI) -> None:
        begun = await client.post("/upload/v1beta/files?uploadType=resumable&alt=json", json={"file": {}},
                                  headers=keyed(**{"x-upload-content-type": "application/pdf",
                                                   "x-upload-content-length": str(len(PDF))}))
        url = begun.headers["location"]
        part = await client.put(url, content=PDF[:100], headers={"Content-Range": f"bytes 0-99/{len(PDF)}"})
        assert part.status_code == 308 and part.headers["range"] == "bytes=0-99"
        asked = await client.put(url, headers={"Content-Range": f"bytes */{len(PDF)}"})
        assert asked.status_code == 308 and asked.headers["range"] == "bytes=0-99"
        last = f"bytes 100-{len(PDF) - 1}/{len(PDF)}"
        rest = await client.put(url, content=PDF[100:], headers={"Content-Range": last})
        assert rest.status_code == 200 and rest.json()["file"]["state"] == "ACTIVE"

    drive(tmp_path, scenario)


def test_multipart_and_plain_uploads(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, _: FastAPI) -> None:
        body = (b"--b\r\nContent-Type: application/json\r\n\r\n{\"file\": {\"displayName\": \"notes\"}}\r\n"
                b"--b\r\nContent-Type: text/plain\r\n\r\nsome notes\r\n--b--\r\n")
        multipart = await client.post("/upload/v1beta/files?uploadType=multipart", content=body,
                                      headers=keyed(**{"Content-Type": "multipart/related; boundary=b"}))
        assert multipart.status_code == 200, multipart.text
        assert multipart.json()["file"]["displayName"] == "notes" and multipart.json()["file"]["sizeBytes"] == "10"
        plain = await client.post("/upload/v1beta/files?uploadType=media", content=PDF,
                                  headers=keyed(**{"Content-Type": "application/pdf"}))
        assert plain.json()["file"]["mimeType"] == "application/pdf"

    drive(tmp_path, scenario)


def test_the_reference_curl_start_with_single_quotes(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, _: FastAPI) -> None:
        answer = await client.post("/upload/v1beta/files?key=" + KEY, content=b"{'file': {'display_name': 'AUDIO'}}",
                                   headers={"X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start",
                                            "X-Goog-Upload-Header-Content-Length": "3",
                                            "X-Goog-Upload-Header-Content-Type": "text/plain",
                                            "Content-Type": "application/json"})
        assert answer.status_code == 200 and "x-goog-upload-url" in answer.headers

    drive(tmp_path, scenario)


@pytest.mark.parametrize("mime,data,status,words", [
    ("image/png", PDF, 400, "bytes are application/pdf"),
    ("text/plain", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, 400, "not UTF-8"),
])
def test_bytes_that_contradict_their_type_make_no_file(tmp_path: Path, mime: str, data: bytes, status: int,
                                                       words: str) -> None:
    async def scenario(client: httpx.AsyncClient, _: FastAPI) -> None:
        url = await start(client, len(data), mime)
        answer = await chunk(client, url, data, 0, "upload, finalize")
        assert answer.status_code == status and words in answer.json()["error"]["message"]
        assert (await client.get("/v1beta/files", headers=keyed())).json() == {"files": []}
        assert not any(p.is_file() for p in tmp_path.rglob("uploads/*"))

    drive(tmp_path, scenario)


def test_sizes_are_held_to_what_was_declared(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, _: FastAPI) -> None:
        url = await start(client, 10, "text/plain")
        over = await chunk(client, url, b"x" * 11, 0, "upload")
        assert over.status_code == 400 and "larger than the 10 bytes" in over.json()["error"]["message"]
        short = await chunk(client, url, b"x" * 5, 0, "upload, finalize")
        assert short.status_code == 400 and "declared 10" in short.json()["error"]["message"]
        too_big = await client.post("/upload/v1beta/files", json={}, headers=keyed(**{
            "X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start",
            "X-Goog-Upload-Header-Content-Length": str(3 * 1024**3),
            "X-Goog-Upload-Header-Content-Type": "video/mp4"}))
        assert too_big.status_code == 400 and "2 GB" in too_big.json()["error"]["message"]
        no_key = await client.post("/upload/v1beta/files", json={}, headers={
            "X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start"})
        assert no_key.status_code == 403

    drive(tmp_path, scenario)


def test_a_file_that_cannot_be_read_is_failed_with_the_reason(tmp_path: Path) -> None:
    broken = b"%PDF-1.4\n" + b"\x00" * 200

    async def scenario(client: httpx.AsyncClient, app: FastAPI) -> None:
        url = await start(client, len(broken), "application/pdf")
        file = (await chunk(client, url, broken, 0, "upload, finalize")).json()["file"]
        assert file["state"] == "FAILED" and "PDF cannot be read" in file["error"]["message"]
        assert file["error"]["code"] == 400

    drive(tmp_path, scenario)


def test_expired_files_and_uploads_go_with_their_bytes(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, app: FastAPI) -> None:
        url = await start(client, len(PDF), "application/pdf")
        name = (await chunk(client, url, PDF, 0, "upload, finalize")).json()["file"]["name"]
        pending = await start(client, 100, "text/plain")
        await chunk(client, pending, b"y" * 50, 0, "upload")
        database = Database(tmp_path / "gemserve.db")
        with database.connect() as db:
            db.execute("UPDATE files SET expire_time = '2000-01-01T00:00:00.000000Z'")
            db.execute("UPDATE uploads SET expire_time = '2000-01-01T00:00:00.000000Z'")
        assert (await client.get(f"/v1beta/{name}", headers=keyed())).status_code == 403
        await app.state.files.sweep()
        assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.parent.name in ("uploads",)
                    or p.is_file() and "files" in p.parts]
        assert (await chunk(client, pending, b"y" * 50, 50, "upload, finalize")).status_code == 404

    drive(tmp_path, scenario)


def test_processing_left_pending_by_a_stop_is_done_at_the_next_start(tmp_path: Path) -> None:
    readers = ScriptedReaders(ocr=["SCANNED"])

    async def stopped(client: httpx.AsyncClient, app: FastAPI) -> None:
        url = await start(client, len(PDF), "application/pdf")
        name = (await chunk(client, url, PDF, 0, "upload, finalize")).json()["file"]["name"]
        with Database(tmp_path / "gemserve.db").connect() as db:  # as if the server had stopped mid-processing
            db.execute("UPDATE files SET state = 'PROCESSING', rendering = NULL")
        assert (await client.get(f"/v1beta/{name}", headers=keyed())).json()["state"] == "PROCESSING"

    async def restarted(client: httpx.AsyncClient, app: FastAPI) -> None:
        await app.state.files.resume()
        caller = app.state.identities.caller_for_key(KEY)
        (name,) = [f["name"] for f in (await client.get("/v1beta/files", headers=keyed())).json()["files"]]
        _, rendering = await app.state.files.usable(caller, name[6:])  # waits for the processing
        assert "pineapple" in rendering.text
        assert (await client.get(f"/v1beta/{name}", headers=keyed())).json()["state"] == "ACTIVE"

    drive(tmp_path, stopped, readers)
    drive(tmp_path, restarted, readers)


def test_hostile_uploads_get_400s_and_leave_nothing_behind(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, app: FastAPI) -> None:
        start_headers = keyed(**{"X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start",
                                 "X-Goog-Upload-Header-Content-Type": "text/plain", "Content-Type": "application/json"})
        for body in (b'{"file": {"sizeBytes": ' + b"9" * 5000 + b"}}", b"[" * 20000, b"{'file': {1: 2}}",
                     b"{1: 0, 'a': 0}"):
            answer = await client.post("/upload/v1beta/files", content=body, headers=start_headers)
            assert answer.status_code == 400, (body[:30], answer.text)
        for _ in range(20):  # chunks for uploads that do not exist: no key needed, nothing kept
            stray = await client.post("/upload/v1beta/files?upload_id=nope", content=b"x",
                                      headers={"X-Goog-Upload-Command": "upload", "X-Goog-Upload-Offset": "0"})
            assert stray.status_code == 404 and stray.headers["x-goog-upload-status"] == "final"
        assert not app.state.files._locks
        url = await start(client, 10, "text/plain")
        odd = await client.post(url, content=b"x", headers={"X-Goog-Upload-Command": "upload",
                                                            "X-Goog-Upload-Offset": b"\xb2"})  # "²" in latin-1
        assert odd.status_code == 400 and odd.headers["x-goog-upload-status"] == "final"
        assert (await chunk(client, url, b"x" * 11, 0, "upload")).status_code == 400
        (partial,) = (tmp_path / "uploads").iterdir()
        assert partial.stat().st_size == 0  # the refused chunk's bytes are gone at once
        ranged = await client.put(url, content=b"x" * 4, headers={"Content-Range": "bytes 0-3/4"})
        assert ranged.status_code == 400  # 4 bytes of a file that declared 10
        raw = await client.post("/upload/v1beta/files?uploadType=media", content=b"\x00\x01",
                                headers=keyed(**{"Content-Type": "text/plain"}))
        assert raw.status_code == 400 and len(list((tmp_path / "uploads").iterdir())) == 1

    drive(tmp_path, scenario)


def test_a_type_no_model_reads_is_stored_and_refused_when_used(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, app: FastAPI) -> None:
        url = await start(client, 8, "application/zip")
        file = (await chunk(client, url, b"PK\x03\x04data", 0, "upload, finalize")).json()["file"]
        assert file["state"] == "ACTIVE"
        with pytest.raises(ApiError, match="Unsupported MIME type: application/zip"):
            await app.state.files.usable(app.state.identities.caller_for_key(KEY), file["name"][6:])

    drive(tmp_path, scenario)


def test_a_file_deleted_while_processing_and_uploaded_again_keeps_its_own_bytes_and_rendering(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files_service, "FINALIZE_WAIT_SECONDS", 0.1)
    readers = HeldReaders(ocr=["FIRST FILE"])
    scan = io.BytesIO()
    text_picture(["FIRST FILE"]).save(scan, "PDF", resolution=100.0)
    second = text_pdf(["The second file says pineapple."])

    async def scenario(client: httpx.AsyncClient, app: FastAPI) -> None:
        named = {"file": {"name": "files/same"}}
        url = await start(client, len(scan.getvalue()), "application/pdf", named)
        first = (await chunk(client, url, scan.getvalue(), 0, "upload, finalize")).json()["file"]
        assert first["name"] == "files/same" and first["state"] == "PROCESSING"
        assert (await client.delete("/v1beta/files/same", headers=keyed())).status_code == 200
        url = await start(client, len(second), "application/pdf", named)
        answer = chunk(client, url, second, 0, "upload, finalize")
        readers.release.set()
        assert (await answer).status_code == 200
        _, rendering = await app.state.files.usable(app.state.identities.caller_for_key(KEY), "same")
        assert "pineapple" in rendering.text and "FIRST FILE" not in rendering.text
        (blob,) = [p for p in (tmp_path / "files").rglob("*") if p.is_file()]
        assert blob.read_bytes() == second

    drive(tmp_path, scenario, readers)


def test_a_file_being_processed_shows_its_progress(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files_service, "FINALIZE_WAIT_SECONDS", 0.1)
    readers = HeldReaders(ocr=["FIRST FILE"])
    png = io.BytesIO()
    text_picture(["FIRST FILE"]).save(png, "PNG")

    async def scenario(client: httpx.AsyncClient, app: FastAPI) -> None:
        url = await start(client, len(png.getvalue()), "image/png")
        uploaded = (await chunk(client, url, png.getvalue(), 0, "upload, finalize")).json()["file"]
        assert uploaded["state"] == "PROCESSING"
        assert uploaded["processingProgress"] == {"fraction": 0.0, "step": "reading the image"}
        got = (await client.get(f"/v1beta/{uploaded['name']}", headers=keyed())).json()
        assert got["processingProgress"] == {"fraction": 0.0, "step": "reading the image"}
        (listed,) = (await client.get("/v1beta/files", headers=keyed())).json()["files"]
        assert listed["processingProgress"] == got["processingProgress"]
        readers.release.set()
        await app.state.files.usable(app.state.identities.caller_for_key(KEY), uploaded["name"][6:])
        done = (await client.get(f"/v1beta/{uploaded['name']}", headers=keyed())).json()
        assert done["state"] == "ACTIVE" and "processingProgress" not in done

    drive(tmp_path, scenario, readers)
