"""Wiro's request signature, the nonce source, and the headers the client sends."""

from __future__ import annotations

import itertools
import json
import threading

import httpx
import pytest
from pydantic import SecretStr

from app.wiro import NonceSource, WiroClient, sign, verify

KEY = "test-api-key"
SECRET = "test-api-secret"
VECTOR_NONCE = "1734513807"
VECTOR_SIGNATURE = "4e67485ace9c18196d65275b4f42c54c0b84aee6750ba6a6a78de9ac4227ac9e"


def test_published_vector() -> None:
    assert sign(KEY, SECRET, VECTOR_NONCE) == VECTOR_SIGNATURE


def test_verify_accepts_the_vector_and_rejects_changes() -> None:
    assert verify(KEY, SECRET, VECTOR_NONCE, VECTOR_SIGNATURE)
    assert verify(KEY, SECRET, VECTOR_NONCE, VECTOR_SIGNATURE.upper())
    assert not verify(KEY, SECRET, "1734513808", VECTOR_SIGNATURE)
    assert not verify(KEY, "other-secret", VECTOR_NONCE, VECTOR_SIGNATURE)
    assert not verify("other-key", SECRET, VECTOR_NONCE, VECTOR_SIGNATURE)


def test_nonce_strictly_increases_under_a_frozen_clock() -> None:
    nonces = NonceSource(clock=lambda: 1734513807.0)
    values = [nonces.next() for _ in range(1000)]
    assert values[0] == 1734513807000
    assert values == list(range(1734513807000, 1734513807000 + 1000))


def test_nonce_never_goes_back_when_the_clock_does() -> None:
    now = [2000.0]
    nonces = NonceSource(clock=lambda: now[0])
    first = nonces.next()
    now[0] = 1000.0  # the wall clock stepped back
    second = nonces.next()
    now[0] = 3000.0
    third = nonces.next()
    assert first == 2_000_000
    assert second == 2_000_001
    assert third == 3_000_000


def test_nonce_unique_and_increasing_across_threads() -> None:
    nonces = NonceSource(clock=lambda: 1734513807.0)
    per_thread: list[list[int]] = [[] for _ in range(8)]
    start = threading.Barrier(8)

    def draw(out: list[int]) -> None:
        start.wait()
        for _ in range(1000):
            out.append(nonces.next())

    threads = [threading.Thread(target=draw, args=(out,)) for out in per_thread]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    every = [value for out in per_thread for value in out]
    assert len(every) == 8000
    assert len(set(every)) == 8000
    for out in per_thread:
        assert all(a < b for a, b in itertools.pairwise(out))
    # A frozen clock means the counter alone moved: exactly the next 8000 integers.
    assert sorted(every) == list(range(1734513807000, 1734513807000 + 8000))


def _client(api_key, api_secret, nonce_source=None) -> WiroClient:
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(500)))
    return WiroClient(
        base_url="https://api.wiro.test/v1",
        api_key=api_key,
        api_secret=api_secret,
        http=http,
        nonce_source=nonce_source,
    )


@pytest.mark.parametrize("wrap", [str, SecretStr])
def test_signature_mode_headers(wrap) -> None:
    client = _client(wrap(KEY), wrap(SECRET), NonceSource(clock=lambda: 1734513807.0))
    first = client.auth_headers()
    second = client.auth_headers()

    assert set(first) == {"x-api-key", "x-nonce", "x-signature"}
    assert first["x-api-key"] == KEY
    assert first["x-nonce"] == "1734513807000"
    assert first["x-signature"] == sign(KEY, SECRET, first["x-nonce"])
    assert second["x-nonce"] == "1734513807001"
    assert second["x-signature"] == sign(KEY, SECRET, second["x-nonce"])
    assert first["x-signature"] != second["x-signature"]


def test_signature_mode_reproduces_the_vector_for_its_nonce() -> None:
    client = _client(KEY, SECRET, NonceSource(clock=lambda: 1734513.807))
    headers = client.auth_headers()
    assert headers["x-nonce"] == VECTOR_NONCE
    assert headers["x-signature"] == VECTOR_SIGNATURE


@pytest.mark.parametrize("secret", [None, "", SecretStr("")])
def test_key_only_mode_headers(secret) -> None:
    assert _client(KEY, secret).auth_headers() == {"x-api-key": KEY}


@pytest.mark.parametrize("key", [None, "", SecretStr("")])
def test_no_key_means_no_headers(key) -> None:
    assert _client(key, SECRET).auth_headers() == {}


async def test_sent_requests_carry_a_valid_signature_each() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"result": True, "errors": []})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        client = WiroClient(
            base_url="https://api.wiro.test/v1",
            api_key=SecretStr(KEY),
            api_secret=SecretStr(SECRET),
            http=http,
        )
        await client.input_output_delete("token-1")
        await client.input_output_delete("token-2")

    nonces = [int(request.headers["x-nonce"]) for request in seen]
    assert nonces[0] < nonces[1]
    for request in seen:
        assert request.headers["x-api-key"] == KEY
        assert verify(KEY, SECRET, request.headers["x-nonce"], request.headers["x-signature"])
        # The signature covers neither path nor body: nothing else secret is sent.
        assert SECRET not in json.dumps(dict(request.headers))
        assert SECRET.encode() not in request.content


async def test_key_only_requests_send_only_the_key() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"result": True, "errors": []})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        client = WiroClient(
            base_url="https://api.wiro.test/v1", api_key=KEY, api_secret=None, http=http
        )
        await client.input_output_delete("token-1")

    (request,) = seen
    assert request.headers["x-api-key"] == KEY
    assert "x-nonce" not in request.headers
    assert "x-signature" not in request.headers


def test_replica_slots_keep_nonces_unique_across_processes() -> None:
    a = NonceSource(clock=lambda: 1734513807.0, replica_slot=1)
    b = NonceSource(clock=lambda: 1734513807.0, replica_slot=2)
    va = [a.next() for _ in range(500)]
    vb = [b.next() for _ in range(500)]
    assert va == sorted(set(va)) and vb == sorted(set(vb))
    assert not set(va) & set(vb)
    assert va[0] == 1734513807000 * 1000 + 1
