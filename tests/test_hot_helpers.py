"""Small helpers on every submit, made cheaper, checked against what they replaced: the
input URL's character check (``app.catalog``), task ids (``app.ids``) and the simulator's
socket tokens."""

from __future__ import annotations

import string
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app import catalog
from app.ids import CROCKFORD, encode_ulid, id_time, new_task_id, ulid_ms
from app.simulator.engine import _token


def test_the_url_check_refuses_exactly_whitespace_and_control_characters() -> None:
    """Every code point: the pattern matches where the per-character rule it replaced
    (``c.isspace() or ord(c) < 32``) does, and nowhere else."""
    differ = [
        c
        for c in range(0x110000)
        if (catalog._SPACE_OR_CONTROL.search(chr(c)) is not None) != (chr(c).isspace() or c < 32)
    ]
    assert differ == []


@pytest.mark.parametrize("bad", ["\u00a0", "\u2028", "\u3000", "\x7f\t", "\x1f", " "])
def test_a_url_with_a_space_or_control_character_is_refused(bad: str) -> None:
    assert catalog.check_url("https://img.example/a.png") is None
    assert catalog.check_url(f"https://img.example/a{bad}.png") is not None


def _one_at_a_time(n: int) -> str:
    """The encoding as it was written before: five bits at a time, from the lowest."""
    chars = []
    for _ in range(26):
        chars.append(CROCKFORD[n & 31])
        n >>= 5
    return "".join(reversed(chars))


@given(st.integers(min_value=0, max_value=2**128 - 1))
def test_a_ulid_reads_as_it_did_five_bits_at_a_time(n: int) -> None:
    text = encode_ulid(n)
    assert text == _one_at_a_time(n)
    assert ulid_ms(text) == n >> 80


@pytest.mark.parametrize("n", [0, 1, 2**80 - 1, 2**80, 2**127, 2**128 - 1])
def test_a_ulids_edges(n: int) -> None:
    assert encode_ulid(n) == _one_at_a_time(n)
    assert ulid_ms(encode_ulid(n)) == n >> 80


@pytest.mark.parametrize(
    "text", ["01ARZ3NDEK", "01arz3ndek", "01ARZ3NDE", "01ARZ3NDEU", "+1ARZ3NDEK", " 1ARZ3NDEK"]
)
def test_only_ten_crockford_digits_make_a_ulids_time(text: str) -> None:
    if text == "01ARZ3NDEK":
        expected = 0
        for ch in text:  # as it was read before: one digit at a time
            expected = expected * 32 + CROCKFORD.index(ch)
        assert ulid_ms(text) == expected
    else:  # lower case, too short, a letter Crockford leaves out, what int() would take
        with pytest.raises(ValueError):
            ulid_ms(text)


def test_a_task_ids_time_is_its_millisecond() -> None:
    now = datetime(2026, 12, 7, 21, 30, 15, 123456, tzinfo=UTC)
    assert id_time(new_task_id(now)) == now.replace(microsecond=123000)


def test_socket_tokens_use_the_whole_alphabet_in_every_place() -> None:
    alphabet = set(string.ascii_letters + string.digits)
    tokens = [_token() for _ in range(2000)]
    assert all(len(t) == 30 and set(t) <= alphabet for t in tokens)
    # Each of the 62 characters in the first and the last place (a character missing
    # from 2,000 fair draws: probability ~1e-12).
    assert {t[0] for t in tokens} == alphabet
    assert {t[-1] for t in tokens} == alphabet
    assert len(set(tokens)) == len(tokens)
