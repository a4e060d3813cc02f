"""The media pool's order and its cache of inline renderings: keys take turns, and one key's renderings are not
served to another."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gemserve.media.processor import MediaProcessor, Progress, Turns
from tests.media.samples import HeldReaders, ScriptedReaders, encoded, text_picture


def test_keys_take_turns_so_a_long_queue_delays_another_key_by_one_job() -> None:
    order: list[str] = []

    async def job(turns: Turns, owner: str, name: str) -> None:
        await turns.take(owner)
        order.append(name)
        await asyncio.sleep(0)
        turns.release()

    async def go() -> None:
        turns = Turns()
        await turns.take("a")  # a job of a's is running
        jobs = [asyncio.create_task(job(turns, "a", f"a{i}")) for i in range(1, 4)]
        await asyncio.sleep(0)
        jobs.append(asyncio.create_task(job(turns, "b", "b1")))
        jobs.append(asyncio.create_task(job(turns, "c", "c1")))
        await asyncio.sleep(0)
        turns.release()
        await asyncio.gather(*jobs)

    asyncio.run(go())
    assert order == ["a1", "b1", "c1", "a2", "a3"]


def test_a_waiter_that_leaves_gives_up_its_place_and_a_turn_given_as_it_leaves_passes_on() -> None:
    order: list[str] = []

    async def go() -> None:
        turns = Turns()
        await turns.take("a")
        leaving = asyncio.create_task(turns.take("b"))
        staying = asyncio.create_task(turns.take("c"))
        await asyncio.sleep(0)
        turns.release()  # the turn goes to b, which is cancelled before it runs: it must reach c
        leaving.cancel()
        await asyncio.gather(leaving, return_exceptions=True)
        await asyncio.wait_for(staying, 1)
        order.append("c")
        turns.release()
        await asyncio.wait_for(turns.take("d"), 1)  # nobody holds a turn: d runs at once

    asyncio.run(go())
    assert order == ["c"]


def test_inline_renderings_are_kept_per_key(tmp_path: Path) -> None:
    readers = ScriptedReaders(ocr=["SIGN"])
    png = encoded(text_picture(["SIGN"]), "PNG")

    async def go() -> None:
        processor = MediaProcessor(tmp_path, readers=readers)  # type: ignore[arg-type]
        try:
            first = await processor.render_bytes(png, "image/png", "sign", "key-a")
            again = await processor.render_bytes(png, "image/png", "sign", "key-a")
            assert again is first and readers.calls["ocr"] == 1
            other = await processor.render_bytes(png, "image/png", "sign", "key-b")
            assert other == first and readers.calls["ocr"] == 2  # read again for another key
        finally:
            processor.close()

    asyncio.run(go())


def test_progress_is_known_while_a_job_waits_and_runs_and_forgotten_when_it_ends(tmp_path: Path) -> None:
    readers = HeldReaders(ocr=["SIGN"])
    png = encoded(text_picture(["SIGN"]), "PNG")
    path = tmp_path / "sign.png"
    path.write_bytes(png)

    async def go() -> None:
        processor = MediaProcessor(tmp_path, readers=readers)  # type: ignore[arg-type]
        try:
            first = asyncio.create_task(processor.render_file(path, "image/png", "one", "key-a", job="one"))
            await asyncio.sleep(0.05)
            second = asyncio.create_task(processor.render_file(path, "image/png", "two", "key-b", job="two"))
            await asyncio.sleep(0.05)
            running, waiting = processor.progress("one"), processor.progress("two")
            assert running is not None and running.step == "reading the image"
            assert waiting is not None and waiting.done == 0
            assert waiting.step == "waiting for other files to be processed first"
            readers.release.set()
            await asyncio.gather(first, second)
            assert processor.progress("one") is None and processor.progress("two") is None
        finally:
            processor.close()

    asyncio.run(go())


def test_a_job_whose_caller_leaves_stops_at_its_next_report_and_only_then_passes_the_turn(tmp_path: Path) -> None:
    readers = HeldReaders(ocr=["SIGN"])
    pdf = tmp_path / "scan.pdf"
    scan = text_picture(["PAGE"])
    scan.save(pdf, "PDF", resolution=100.0, save_all=True, append_images=[scan, scan])  # three scanned pages

    async def go() -> None:
        processor = MediaProcessor(tmp_path, readers=readers)  # type: ignore[arg-type]
        try:
            leaving = asyncio.create_task(processor.render_file(pdf, "application/pdf", "scan", "key-a", job="a"))
            await asyncio.sleep(0.05)  # reading page 1, held in OCR
            leaving.cancel()
            await asyncio.gather(leaving, return_exceptions=True)
            assert processor._turns.busy  # its thread still runs: the turn is not passed on yet
            after = asyncio.create_task(processor.render_file(pdf, "application/pdf", "scan", "key-b", job="b"))
            await asyncio.sleep(0.05)
            assert processor.progress("b") == Progress(0.0, "waiting for other files to be processed first")
            readers.release.set()  # page 1 ends; the cancelled job stops before page 2
            rendering = await asyncio.wait_for(after, 10)
            assert rendering.text.count("SIGN") == 3
            assert readers.calls["ocr"] == 1 + 3
        finally:
            processor.close()

    asyncio.run(go())
