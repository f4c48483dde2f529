"""serving/streaming.TextStream: the text a client receives equals the reply cut at the first stop sequence."""

import random

import pytest

from nanochat.serving.streaming import TextStream


class ByteTokenizer:
    """Token i = byte i: multi-byte characters arrive split over several tokens."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def stream_text(reply, stop):
    stream, sent = TextStream(ByteTokenizer(), stop), ""
    for token in reply.encode("utf-8"):
        piece, stopped = stream.add(token)
        sent += piece
        if stopped:
            return sent, True
    return sent + stream.finish(), False


def expected(reply, stop):
    hits = [i for i in (reply.find(s) for s in stop if s) if i >= 0]
    return (reply[:min(hits)], True) if hits else (reply, False)


@pytest.mark.parametrize("seed", range(100))
def test_random_replies_and_stops_match_a_plain_search(seed):
    rng = random.Random(seed)
    alphabet = "ab é€\n"
    reply = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
    stop = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(0, 4))]
    assert stream_text(reply, stop) == expected(reply, stop)


def test_text_that_may_begin_a_stop_is_held_back_until_decided():
    stream = TextStream(ByteTokenizer(), ["END!"])
    pieces = [stream.add(b)[0] for b in b"abcEN"]
    assert "".join(pieces) == "abc"  # "EN" could begin "END!"
    assert stream.add(ord("x")) == ("ENx", False)  # it did not


def test_a_long_stop_after_a_long_reply():
    """Only the last (longest stop - 1) characters are held back, and the stop is found across many tokens."""
    stream = TextStream(ByteTokenizer(), ["a" * 255 + "b"])
    sent = "".join(stream.add(ord("a"))[0] for _ in range(5000))
    assert sent == "a" * (5000 - 255)  # the last 255 could begin the stop
    assert stream.add(ord("b")) == ("", True)


def test_an_sse_event_stays_one_line_for_every_line_splitter():
    """U+2028/U+2029/U+0085 are legal unescaped in JSON but end a line for str.splitlines (httpx's aiter_lines)."""
    import json

    from nanochat.serving.app import _sse
    text = "a\u2028b\u2029c\x85d \U0001F600 é"
    event = _sse(json.dumps({"content": text}, ensure_ascii=False))
    assert event.endswith("\n\n") and len(event[:-2].splitlines()) == 1
    assert json.loads(event.removeprefix("data: "))["content"] == text
