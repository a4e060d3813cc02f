"""Media made in the tests: PDFs written by hand (one line of Helvetica per page), pictures of text, and
readers that answer from a script instead of running OCR, a classifier or Whisper."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from typing import IO, Any

from PIL import Image, ImageDraw, ImageFont


def text_pdf(pages: list[str]) -> bytes:
    """A valid PDF with one line of text on each page (ASCII), its cross-reference table computed."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [%s] /Count %d >>" % (" ".join(f"{4 + 2 * i} 0 R" for i in range(len(pages)))
                                                            .encode(), len(pages)),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, line in enumerate(pages):
        escaped = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = f"BT /F1 18 Tf 72 720 Td ({escaped}) Tj ET".encode()
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
                       b"/Contents %d 0 R >>" % (5 + 2 * i))
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    table = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, table)
    return bytes(out)


def text_picture(lines: list[str], size: tuple[int, int] = (900, 500)) -> Image.Image:
    picture = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=44)
    for i, line in enumerate(lines):
        draw.text((40, 60 + 80 * i), line, fill="black", font=font)
    return picture


def encoded(picture: Image.Image, kind: str) -> bytes:
    out = io.BytesIO()
    picture.save(out, kind)
    return out.getvalue()


class ScriptedReaders:
    """Readers answering from a script, counting their calls."""

    def __init__(self, ocr: list[str] | None = None, labels: list[tuple[str, float]] | None = None,
                 speech: list[tuple[float, str]] | None = None) -> None:
        self.ocr_lines = ocr or []
        self.label_list = labels or []
        self.speech = speech or []
        self.calls: dict[str, int] = {"ocr": 0, "labels": 0, "transcribe": 0}

    def ocr(self, picture: Any) -> list[str]:
        self.calls["ocr"] += 1
        return list(self.ocr_lines)

    def labels(self, picture: Any) -> list[tuple[str, float]]:
        self.calls["labels"] += 1
        return list(self.label_list)

    def transcribe(self, source: IO[bytes], heard: Callable[[float], None] | None = None) -> list[tuple[float, str]]:
        self.calls["transcribe"] += 1
        source.read()
        for start, _ in self.speech:
            if heard is not None:
                heard(start)
        return list(self.speech)


class HeldReaders(ScriptedReaders):
    """Scripted readers whose OCR waits until `release` is set: a rendering stays in progress meanwhile."""

    def __init__(self, ocr: list[str]) -> None:
        super().__init__(ocr=ocr)
        self.release = threading.Event()

    def ocr(self, picture: Any) -> list[str]:
        self.release.wait(10)
        return super().ocr(picture)
