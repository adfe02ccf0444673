"""Terminal output encoding without sockets: any bytes, cut anywhere, come out whole."""

from __future__ import annotations

import base64

from hypothesis import given, settings
from hypothesis import strategies as st

from aether.terminal.output import OutputEncoder, Scrollback


def decode(fields: dict) -> bytes:
    data = fields["data"]
    return base64.b64decode(data) if fields.get("encoding") == "base64" else data.encode()


def run(pieces: list[bytes]) -> tuple[bytes, list[dict]]:
    encoder, out = OutputEncoder(), []
    for piece in pieces:
        fields = encoder.feed(piece)
        if fields:
            out.append(fields)
    tail = encoder.flush()
    if tail:
        out.append(tail)
    return b"".join(map(decode, out)), out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64), st.lists(st.integers(0, 64), max_size=8))
def test_any_bytes_cut_anywhere_come_out_whole(data, cuts):
    assert run(split(data, cuts))[0] == data


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=40), st.lists(st.integers(0, 200), max_size=8))
def test_text_cut_inside_characters_is_never_base64(text, cuts):
    data = text.encode()
    whole, out = run(split(data, cuts))
    assert whole == data and all("encoding" not in f for f in out)


def test_a_byte_that_cannot_start_a_character_is_not_held_back():
    encoder = OutputEncoder()
    assert decode(encoder.feed(b"ok\xff")) == b"ok\xff" and encoder.held == 0
    assert encoder.feed(b"\xe2\x82") is None and encoder.held == 2


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60), st.integers(0, 300), st.integers(1, 40))
def test_replay_starts_at_a_character_and_holds_back_the_live_tail(text, cut, limit):
    data = text.encode()[:cut]  # may end inside a character, which the live encoder holds
    back, encoder = Scrollback(limit), OutputEncoder()
    back.append(data)
    encoder.feed(data)
    replayed = b"".join(decode(f) for f in back.replay(hold=encoder.held))
    sent = data[: len(data) - encoder.held]
    replayed.decode("utf-8")  # starts and ends on character boundaries
    assert sent.endswith(replayed)
    assert len(replayed) >= min(limit, len(data)) - encoder.held - 3
