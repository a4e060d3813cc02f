"""Renderings: a medium as the text a text-only model reads (docs/media.md shows each form).

- text files: their text;
- PDF: the text of each page under a page marker; a page without text (a scan) is read by OCR;
- images: the text in them (OCR) and what they show (an ImageNet classifier's best labels);
- audio: a transcript (Whisper) with the time each segment starts;
- video: the sound track's transcript, and frames sampled across it, each read as an image is, with its time.

Every function runs on the media pool's thread (`processor.py`), tells how far it has come through `report`
(a fraction and what it is doing) and raises `MediaError` for bytes it cannot read.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from gemserve.media import kinds
from gemserve.media.readers import Readers
from gemserve.media.rendering import MediaError, Rendering

MAX_PDF_PAGES = 1000
MAX_OCR_PAGES = 100  # scanned pages read by OCR per document; later ones are marked unread
MIN_PAGE_TEXT = 16  # characters: a page with less is taken for a scan
MAX_FRAMES = 16
SEEK_AFTER_SECONDS = 60
MAX_IMAGE_PIXELS = 60_000_000
MAX_TEXT_CHARS = 8_000_000
# Speech is transcribed at 3-6 times its speed on 2 cores, and an hour's transcript (about 12,000 tokens) is as
# much as the built-in models' windows hold with room for a question: longer sound is refused, not read for hours.
MAX_MEDIA_SECONDS = 3600

Report = Callable[[float, str], None]


def _silent(done: float, step: str) -> None:
    pass


def render_file(path: Path, mime_type: str, name: str, readers: Readers, report: Report | None = None) -> Rendering:
    with path.open("rb") as handle:
        return _render(handle, mime_type, name, readers, report or _silent)


def render_bytes(data: bytes, mime_type: str, name: str, readers: Readers, report: Report | None = None) -> Rendering:
    return _render(io.BytesIO(data), mime_type, name, readers, report or _silent)


def _render(source: IO[bytes], mime_type: str, name: str, readers: Readers, report: Report) -> Rendering:
    kind = kinds.kind_of(mime_type)
    renderers: dict[str, Callable[[IO[bytes], str, str, Readers, Report], Rendering]] = {
        "text": text, "document": document, "image": image, "audio": audio, "video": video}
    if kind is None:
        raise MediaError(f"Unsupported MIME type: {mime_type}")
    return renderers[kind](source, mime_type, name, readers, report)


def clock(seconds: float) -> str:
    """83.4 -> "1:23"; 3725 -> "1:02:05"."""
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# ---- text --------------------------------------------------------------------------------------------------


def text(source: IO[bytes], mime_type: str, name: str, readers: Readers, report: Report) -> Rendering:
    data = source.read(MAX_TEXT_CHARS * 4 + 1)
    try:
        content = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MediaError(f"the file is declared {mime_type}, but it is not UTF-8 text (byte {exc.start}).") from None
    if len(content) > MAX_TEXT_CHARS:
        raise MediaError(f"the text has more than {MAX_TEXT_CHARS} characters.")
    return Rendering("TEXT", f'[File "{name}" ({mime_type})]\n{content.rstrip()}\n[End of file]\n')


# ---- documents ---------------------------------------------------------------------------------------------


def document(source: IO[bytes], mime_type: str, name: str, readers: Readers, report: Report) -> Rendering:
    import pypdfium2 as pdfium  # type: ignore[import-untyped]

    try:
        pdf = pdfium.PdfDocument(source.read())
    except pdfium.PdfiumError as exc:
        raise MediaError(f"the PDF cannot be read ({exc}).") from None
    try:
        count = len(pdf)
        if count == 0:
            raise MediaError("the PDF has no pages.")
        if count > MAX_PDF_PAGES:
            raise MediaError(f"the PDF has {count} pages; at most {MAX_PDF_PAGES} are read.")
        lines = [f'[Document "{name}" (PDF, {count} page{"s" if count > 1 else ""})]']
        scanned = 0
        for number in range(count):
            report(number / count, f"reading page {number + 1} of {count}")
            page = pdf[number]
            try:
                textpage = page.get_textpage()
                try:
                    content = textpage.get_text_range().replace("\r\n", "\n").replace("\r", "\n").strip()
                finally:
                    textpage.close()
                note = ""
                if len(content) < MIN_PAGE_TEXT:
                    if scanned < MAX_OCR_PAGES:
                        scanned += 1
                        bitmap = page.render(scale=200 / 72)
                        try:
                            found = "\n".join(readers.ocr(bitmap.to_pil()))
                        finally:
                            bitmap.close()
                        if len(found) > len(content):
                            content, note = found, " (scanned; text read by OCR)"
                    else:
                        note = " (scanned; not read: too many scanned pages)"
            finally:
                page.close()
            lines.append(f"[Page {number + 1}]{note}")
            if content:
                lines.append(content)
        lines.append("[End of document]")
        return Rendering("DOCUMENT", "\n".join(lines) + "\n", pages=count)
    finally:
        pdf.close()


# ---- images ------------------------------------------------------------------------------------------------


def open_image(source: IO[bytes]) -> Any:
    from PIL import Image, UnidentifiedImageError

    _register_heif()
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        picture = Image.open(source)
        picture.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise MediaError(f"the image cannot be read ({exc}).") from None
    return picture.convert("RGB")


def _register_heif() -> None:
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return
    register_heif_opener()


def describe(picture: Any, readers: Readers) -> list[str]:
    """What a text-only model reads of a picture: its text, and what it shows."""
    out = []
    found = readers.ocr(picture)
    if found:
        out.append("Text in the image:\n" + "\n".join(found))
    else:
        out.append("Text in the image: none found.")
    labels = readers.labels(picture)
    if labels:
        out.append("What the image shows (an image classifier's best guesses): "
                   + ", ".join(f"{label} ({score:.0%})" for label, score in labels))
    return out


def image(source: IO[bytes], mime_type: str, name: str, readers: Readers, report: Report) -> Rendering:
    report(0.0, "reading the image")
    picture = open_image(source)
    width, height = picture.size
    lines = [f'[Image "{name}" ({mime_type}, {width}x{height} pixels)]', *describe(picture, readers), "[End of image]"]
    return Rendering("IMAGE", "\n".join(lines) + "\n")


# ---- audio and video ---------------------------------------------------------------------------------------


def _media_duration(source: IO[bytes]) -> tuple[float, bool, bool]:
    """(seconds, has sound, has pictures), or MediaError for bytes no demuxer reads."""
    import av

    source.seek(0)
    try:
        with av.open(source, mode="r") as container:
            has_audio = bool(container.streams.audio)
            has_video = bool(container.streams.video)
            duration = container.duration / 1_000_000 if container.duration else 0.0
            if not duration:
                for stream in (*container.streams.audio, *container.streams.video):
                    if stream.duration and stream.time_base:
                        duration = max(duration, float(stream.duration * stream.time_base))
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise MediaError(f"the media cannot be read ({exc}).") from None
    return duration, has_audio, has_video


def _check_length(duration: float, what: str) -> None:
    if duration > MAX_MEDIA_SECONDS:
        raise MediaError(f"the {what} is {clock(duration)} long; at most {clock(MAX_MEDIA_SECONDS)} is read.")


def _transcript(source: IO[bytes], readers: Readers, duration: float, report: Report, share: float) -> list[str]:
    """The transcript, reporting progress from 0 to `share` as the speech is read."""
    def heard(seconds: float) -> None:
        if seconds > MAX_MEDIA_SECONDS:  # a length the container did not tell (a recording in progress's WebM)
            raise MediaError(f"the sound is longer than {clock(MAX_MEDIA_SECONDS)}, which is as much as is read.")
        if duration:
            report(share * seconds / duration, f"transcribing the sound: {clock(seconds)} of {clock(duration)}")
        else:
            report(0.0, f"transcribing the sound: {clock(seconds)}")

    report(0.0, "transcribing the sound")
    source.seek(0)
    try:
        segments = readers.transcribe(source, heard)
    except MediaError:
        raise
    except (ValueError, RuntimeError, OSError) as exc:
        raise MediaError(f"the sound cannot be decoded ({exc}).") from None
    return [f"[{clock(start)}] {words.strip()}" for start, words in segments if words.strip()]


def audio(source: IO[bytes], mime_type: str, name: str, readers: Readers, report: Report) -> Rendering:
    duration, has_audio, _ = _media_duration(source)
    if not has_audio:
        raise MediaError("the file holds no sound.")
    _check_length(duration, "audio")
    lines = [f'[Audio "{name}" ({clock(duration)} long); transcript, each line with the time it starts:]']
    lines += _transcript(source, readers, duration, report, 1.0) or ["(no speech)"]
    lines.append("[End of audio]")
    return Rendering("AUDIO", "\n".join(lines) + "\n", duration=duration)


def video(source: IO[bytes], mime_type: str, name: str, readers: Readers, report: Report) -> Rendering:
    duration, has_audio, has_video = _media_duration(source)
    if not has_video and not has_audio:
        raise MediaError("the file holds neither pictures nor sound.")
    if has_audio:  # only sound is read at its length; a silent video is read in its 16 frames
        _check_length(duration, "video")
    lines = [f'[Video "{name}" ({clock(duration)} long)]']
    sound_share = 0.7 if has_video and has_audio else 1.0  # transcribing takes most of the time
    if has_audio:
        lines.append("Transcript of the sound, each line with the time it starts:")
        lines += _transcript(source, readers, duration, report, sound_share) or ["(no speech)"]
    else:
        lines.append("The video has no sound.")
    if has_video:
        lines.append("Frames, each with its time:")
        previous = None
        start = sound_share if has_audio else 0.0  # where the frames' share of the work begins
        report(start, "decoding frames")
        frames = _frames(source, duration)
        for number, (moment, picture) in enumerate(frames):
            report(start + (1 - start) * number / len(frames),
                   f"reading frame {number + 1} of {len(frames)}")
            seen = describe(picture, readers)
            if seen == previous:
                continue  # a still scene: said once
            previous = seen
            lines.append(f"[{clock(moment)}] " + " ".join(seen))
    lines.append("[End of video]")
    return Rendering("VIDEO", "\n".join(lines) + "\n", duration=duration)


def _frames(source: IO[bytes], duration: float) -> list[tuple[float, Any]]:
    """Up to MAX_FRAMES pictures, evenly spread (one a second for short clips), with their times."""
    import av

    count = max(1, min(MAX_FRAMES, math.ceil(duration) if duration else 1))
    wanted = [duration * (i + 0.5) / count for i in range(count)] if duration else [0.0]
    source.seek(0)
    found: list[tuple[float, Any]] = []
    try:
        with av.open(source, mode="r") as container:
            stream = container.streams.video[0]
            for moment in wanted:
                if duration > SEEK_AFTER_SECONDS:  # long videos: to the keyframe before, not through every frame
                    container.seek(int(moment * 1_000_000))
                for frame in container.decode(stream):
                    if frame.time is not None and frame.time + 1e-6 >= moment:
                        found.append((float(frame.time), frame.to_image().convert("RGB")))
                        break
    except (av.FFmpegError, ValueError, OSError) as exc:
        if not found:
            raise MediaError(f"the video's pictures cannot be decoded ({exc}).") from None
    return found
