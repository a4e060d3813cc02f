from gemserve.service.text import TextStream


def feed(stream: TextStream, pieces: list[bytes]) -> str:
    return "".join(stream.push(p) for p in pieces) + stream.flush()


def test_plain_text_passes_through() -> None:
    assert feed(TextStream(), [b"Hello", b" world"]) == "Hello world"


def test_utf8_split_across_tokens_is_reassembled() -> None:
    data = "né 😀".encode()
    stream = TextStream()
    out = [stream.push(data[i : i + 1]) for i in range(len(data))]
    assert "".join(out) + stream.flush() == "né 😀"
    assert all("\ufffd" not in piece for piece in out)


def test_stop_sequence_cuts_and_is_not_emitted() -> None:
    stream = TextStream(["STOP"])
    assert feed(stream, [b"abc S", b"TO", b"P def"]) == "abc "
    assert stream.stopped


def test_partial_stop_prefix_is_held_back_then_released() -> None:
    stream = TextStream(["\n\n"])
    assert stream.push(b"line\n") == "line"
    assert stream.push(b"more") == "\nmore"
    assert not stream.stopped


def test_earliest_of_several_stop_sequences_wins() -> None:
    stream = TextStream(["world", "lo"])
    assert feed(stream, [b"hello world"]) == "hel"
