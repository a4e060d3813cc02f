"""Renderings of each kind of medium, with scripted readers (no OCR, classifier or Whisper models)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from gemserve.media import kinds, render
from gemserve.media.rendering import MediaError, Rendering
from tests.media.samples import ScriptedReaders, encoded, text_pdf, text_picture

MEDIA = Path(__file__).parent.parent / "data" / "media"


def rendered(data: bytes, mime: str, readers: ScriptedReaders, name: str = "x") -> Rendering:
    return render.render_bytes(data, mime, name, readers)  # type: ignore[arg-type]


def test_a_pdf_is_its_pages_text_under_page_markers() -> None:
    readers = ScriptedReaders(ocr=["never used"])
    out = rendered(text_pdf(["The first page names zanzibar.", "The second page says pineapple."]),
                   "application/pdf", readers, "notes.pdf")
    assert out.modality == "DOCUMENT" and out.pages == 2
    assert out.text.splitlines() == ['[Document "notes.pdf" (PDF, 2 pages)]', "[Page 1]",
                                     "The first page names zanzibar.", "[Page 2]", "The second page says pineapple.",
                                     "[End of document]"]
    assert readers.calls["ocr"] == 0


def test_a_scanned_page_is_read_by_ocr() -> None:
    scan = io.BytesIO()
    text_picture(["Quarterly report"]).save(scan, "PDF", resolution=100.0)
    readers = ScriptedReaders(ocr=["Quarterly report", "The magic word is ZEPHYRINE"])
    out = rendered(scan.getvalue(), "application/pdf", readers)
    assert readers.calls["ocr"] == 1
    assert "[Page 1] (scanned; text read by OCR)\nQuarterly report\nThe magic word is ZEPHYRINE" in out.text


@pytest.mark.parametrize("data", [b"%PDF-1.4\nnot really", b"%PDF-1.4\n" + b"\x00" * 100])
def test_a_broken_pdf_is_a_media_error(data: bytes) -> None:
    with pytest.raises(MediaError, match="PDF cannot be read"):
        rendered(data, "application/pdf", ScriptedReaders())


@pytest.mark.parametrize("kind,mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_an_image_is_its_text_and_what_it_shows(kind: str, mime: str) -> None:
    readers = ScriptedReaders(ocr=["OPEN 9-5"], labels=[("bakery", 0.61), ("shop front", 0.2)])
    out = rendered(encoded(text_picture(["OPEN 9-5"]), kind), mime, readers, "sign")
    assert out.modality == "IMAGE"
    assert out.text.splitlines() == [f'[Image "sign" ({mime}, 900x500 pixels)]', "Text in the image:", "OPEN 9-5",
                                     "What the image shows (an image classifier's best guesses): bakery (61%), "
                                     "shop front (20%)", "[End of image]"]


def test_an_image_without_text_says_so() -> None:
    out = rendered(encoded(text_picture([]), "PNG"), "image/png", ScriptedReaders())
    assert "Text in the image: none found." in out.text


def test_a_broken_image_is_a_media_error() -> None:
    data = encoded(text_picture(["x"]), "PNG")[:200]
    with pytest.raises(MediaError, match="image cannot be read"):
        rendered(data, "image/png", ScriptedReaders())


def test_a_text_file_is_its_text() -> None:
    out = rendered("Zeile eins\nLine two ✓\n".encode(), "text/plain", ScriptedReaders(), "a11.txt")
    assert out == Rendering("TEXT", '[File "a11.txt" (text/plain)]\nZeile eins\nLine two ✓\n[End of file]\n')
    with pytest.raises(MediaError, match="not UTF-8"):
        rendered(b"caf\xe9", "text/plain", ScriptedReaders())


def test_audio_is_a_transcript_with_times() -> None:
    readers = ScriptedReaders(speech=[(0.0, " Hello and welcome."), (3.2, " The password is pineapple."),
                                      (65.0, " Goodbye.")])
    out = rendered((MEDIA / "speech.mp3").read_bytes(), "audio/mpeg", readers, "speech.mp3")
    assert out.modality == "AUDIO" and out.duration == pytest.approx(8.1, abs=0.3)
    assert out.text.splitlines()[1:] == ["[0:00] Hello and welcome.", "[0:03] The password is pineapple.",
                                         "[1:05] Goodbye.", "[End of audio]"]


def test_bytes_that_are_no_audio_are_a_media_error() -> None:
    with pytest.raises(MediaError, match="cannot be read"):
        rendered(b"\x00\x01 definitely not a sound file" * 50, "audio/wav", ScriptedReaders())


def test_video_is_its_sound_and_its_frames_a_still_scene_said_once() -> None:
    readers = ScriptedReaders(ocr=["ALPHA 111"], speech=[(0.0, " The secret password is pineapple.")])
    out = rendered((MEDIA / "video.mp4").read_bytes(), "video/mp4", readers, "clip.mp4")
    assert out.modality == "VIDEO" and out.duration == pytest.approx(9.0, abs=0.2)
    lines = out.text.splitlines()
    assert lines[:3] == ['[Video "clip.mp4" (0:09 long)]',
                         "Transcript of the sound, each line with the time it starts:",
                         "[0:00] The secret password is pineapple."]
    assert readers.calls["ocr"] == 9  # one frame a second
    frames = out.text.split("Frames, each with its time:\n")[1]
    assert frames == "[0:00] Text in the image:\nALPHA 111\n[End of video]\n"  # the same picture all along: once


def test_clock() -> None:
    assert [render.clock(s) for s in (0, 8.9, 83.4, 3725)] == ["0:00", "0:08", "1:23", "1:02:05"]


@pytest.mark.parametrize("mime,data,problem", [
    ("image/png", text_pdf(["x"]), "bytes are application/pdf"),
    ("application/pdf", encoded(text_picture(["x"]), "PNG"), "bytes are image/png"),
    ("audio/mpeg", text_pdf(["x"]), "bytes are application/pdf"),
    ("text/plain", encoded(text_picture(["x"]), "PNG"), "not UTF-8 text"),
    ("image/png", b"just some words", "but its bytes are not"),
])
def test_a_type_that_the_bytes_contradict_is_named(mime: str, data: bytes, problem: str) -> None:
    found = kinds.mismatch(mime, data[: kinds.SNIFF_BYTES])
    assert found is not None and problem in found


@pytest.mark.parametrize("mime,data", [
    ("audio/mp4", (MEDIA / "video.mp4").read_bytes()),  # one container, sound or pictures
    ("text/csv", b"a,b\n1,2\n"),
    ("application/zip", b"PK\x03\x04"),  # a type no model reads: stored, refused when used
])
def test_types_the_bytes_agree_with(mime: str, data: bytes) -> None:
    assert kinds.mismatch(mime, data[: kinds.SNIFF_BYTES]) is None


def test_progress_is_reported_as_the_video_is_read() -> None:
    readers = ScriptedReaders(ocr=["ALPHA 111"], speech=[(0.0, " One."), (4.5, " Two.")])
    reports: list[tuple[float, str]] = []
    render.render_bytes((MEDIA / "video.mp4").read_bytes(), "video/mp4", "clip.mp4", readers,  # type: ignore[arg-type]
                        lambda done, step: reports.append((done, step)))
    fractions = [done for done, _ in reports]
    assert fractions == sorted(fractions) and fractions[0] >= 0 and fractions[-1] < 1
    steps = [step for _, step in reports]
    assert steps[0] == "transcribing the sound"
    assert "transcribing the sound: 0:04 of 0:09" in steps
    assert "reading frame 1 of 9" in steps and steps[-1] == "reading frame 9 of 9"


def test_sound_longer_than_the_limit_is_refused_before_it_is_transcribed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(render, "MAX_MEDIA_SECONDS", 5)
    readers = ScriptedReaders(speech=[(0.0, " never transcribed")])
    with pytest.raises(MediaError, match=r"the audio is 0:08 long; at most 0:05 is read"):
        rendered((MEDIA / "speech.mp3").read_bytes(), "audio/mpeg", readers)
    with pytest.raises(MediaError, match=r"the video is 0:09 long; at most 0:05 is read"):
        rendered((MEDIA / "video.mp4").read_bytes(), "video/mp4", readers)
    assert readers.calls["transcribe"] == 0


def test_sound_of_unknown_length_stops_at_the_limit_as_it_is_transcribed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(render, "MAX_MEDIA_SECONDS", 5)
    monkeypatch.setattr(render, "_media_duration", lambda source: (0.0, True, False))  # a length nobody wrote down
    readers = ScriptedReaders(speech=[(0.0, " One."), (4.0, " Two."), (6.0, " Three.")])
    with pytest.raises(MediaError, match="longer than 0:05"):
        rendered((MEDIA / "speech.mp3").read_bytes(), "audio/mpeg", readers)
