"""The fleet key and what it signs: key files refused when unsafe, verifiers, the gateway's cookie,
and the signature a VM checks on every request a gateway forwards."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aether.fleet import auth

KEY = b"k" * 32
OTHER = b"o" * 40
KEYS = auth.FleetKeys([KEY])
NOW = 1_765_000_000.0


def write_key(tmp_path, name: str, data: bytes, mode: int = 0o600):
    path = tmp_path / name
    path.write_bytes(data)
    os.chmod(path, mode)
    return str(path)


def test_key_files(tmp_path):
    good = write_key(tmp_path, "good", os.urandom(16).hex().encode() * 2 + b"\n")
    assert auth.read_key(good) == open(good, "rb").read().rstrip()
    for name, data, mode, words in [
        ("short", b"x" * 31 + b"\n\n", 0o600, "fewer than 32"),
        ("group", b"x" * 32, 0o640, "chmod 600"),
        ("other", b"x" * 32, 0o604, "mode 0604"),
        ("writable", b"x" * 32, 0o620, "group or others"),
        ("huge", b"x" * 5000, 0o600, "not a key"),
    ]:
        with pytest.raises(auth.KeyFileError, match=words):
            auth.read_key(write_key(tmp_path, name, data, mode))
    with pytest.raises(auth.KeyFileError, match="No such file"):
        auth.read_key(str(tmp_path / "absent"))
    with pytest.raises(auth.KeyFileError, match="not a regular file"):
        auth.read_key(str(tmp_path))
    # Rotation: two files, the first signs, both verify.
    old = write_key(tmp_path, "old", OTHER)
    keys = auth.FleetKeys.load(f"{good}, {old}")
    assert len(keys.keys) == 2 and keys.keys[1] == OTHER
    with pytest.raises(auth.KeyFileError, match="one file, or two"):
        auth.FleetKeys.load(f"{good},{old},{good}")
    assert KEY not in repr(KEYS).encode()


def test_verifiers():
    v = auth.verifier(KEYS, "s3cret", "abc123")
    assert len(v) == 43 and "s3cret" not in v
    assert auth.token_matches(KEYS, b"s3cret", b"abc123", v.encode())
    assert not auth.token_matches(KEYS, b"s3cret", b"abc124", v.encode())  # another workspace
    assert not auth.token_matches(KEYS, b"s3cre", b"abc123", v.encode())
    assert not auth.token_matches(KEYS, b"", b"abc123", auth.verifier(KEYS, "", "abc123").encode())
    # Keyed with the fleet key: another fleet (or someone with Redis but no key) cannot check guesses.
    assert not auth.token_matches(auth.FleetKeys([OTHER]), b"s3cret", b"abc123", v.encode())
    # While rotating, a verifier made under the old key still checks.
    assert auth.token_matches(auth.FleetKeys([OTHER, KEY]), b"s3cret", b"abc123", v.encode())


def test_cookies():
    verifier = auth.verifier(KEYS, "tok", "abc123").encode()
    host = b"3000-abc123.preview.example.com"
    value = auth.mint_cookie(KEYS, host, verifier, NOW)
    assert auth.cookie_valid(KEYS, host, verifier, value, NOW)
    assert auth.cookie_valid(KEYS, host.upper(), verifier, value, NOW + auth.COOKIE_TTL - 1)
    assert not auth.cookie_valid(KEYS, host, verifier, value, NOW + auth.COOKIE_TTL)  # expired
    assert not auth.cookie_valid(KEYS, b"3001-abc123.preview.example.com", verifier, value, NOW)  # another port
    assert not auth.cookie_valid(KEYS, b"3000-abc124.preview.example.com", verifier, value, NOW)  # another workspace
    new_verifier = auth.verifier(KEYS, "new token", "abc123").encode()
    assert not auth.cookie_valid(KEYS, host, new_verifier, value, NOW)  # the token changed
    expiry, _, mac = value.partition(b".")
    later = b"%d" % (int(expiry) + 3600)
    assert not auth.cookie_valid(KEYS, host, verifier, later + b"." + mac, NOW)  # expiry edited
    assert not auth.cookie_valid(KEYS, host, verifier, b"0" + value, NOW)  # one spelling
    assert not auth.cookie_valid(auth.FleetKeys([OTHER]), host, verifier, value, NOW)
    # A cookie minted far ahead was not minted here, even with the right MAC.
    far = b"%d" % (NOW + auth.COOKIE_TTL * 10)
    forged = far + b"." + KEYS.mac(b"aether-fleet-cookie\0" + host + b"\0" + far + b"\0" + verifier)
    assert not auth.cookie_valid(KEYS, host, verifier, forged, NOW)
    assert auth.cookie_of([b"a=1; aether_fleet=" + value + b"; b=2"], host, verifier, KEYS, NOW)
    assert not auth.cookie_of([b"aether_fleetx=" + value], host, verifier, KEYS, NOW)


REQUEST = (b"GET", b"3000-abc123.preview.example.com", b"/a?b=1", b"10.0.0.9", b"https", b"443")


def test_signatures():
    value = auth.sign(KEYS, b"cookie", *REQUEST, now=NOW)
    assert value.startswith(b"v1 t=1765000000 a=cookie s=")
    assert auth.verify(KEYS, value, *REQUEST, now=NOW) == b"cookie"
    assert auth.verify(KEYS, value, *REQUEST, now=NOW + auth.WINDOW) == b"cookie"
    assert auth.verify(KEYS, value, *REQUEST, now=NOW - auth.WINDOW) == b"cookie"
    assert auth.verify(KEYS, value, *REQUEST, now=NOW + auth.WINDOW + 1) is None
    assert auth.verify(KEYS, value, *REQUEST, now=NOW - auth.WINDOW - 1) is None
    assert auth.verify(auth.FleetKeys([OTHER]), value, *REQUEST, now=NOW) is None
    assert auth.verify(auth.FleetKeys([OTHER, KEY]), value, *REQUEST, now=NOW) == b"cookie"  # rotating
    assert auth.verify(KEYS, value.replace(b"a=cookie", b"a=public"), *REQUEST, now=NOW) is None
    assert auth.verify(KEYS, value.replace(b"a=cookie", b"a=token"), *REQUEST, now=NOW) is None
    for garbage in (b"", b"v1", b"v2 t=1 a=public s=" + b"A" * 43, value + b" x", value.replace(b"t=1", b"t=01")):
        assert auth.verify(KEYS, garbage, *REQUEST, now=NOW) is None


@settings(max_examples=200, deadline=None)
@given(field=st.integers(0, len(REQUEST) - 1), replacement=st.binary(max_size=40))
def test_a_signature_covers_every_field(field, replacement):
    value = auth.sign(KEYS, b"public", *REQUEST, now=NOW)
    changed = list(REQUEST)
    changed[field] = replacement
    expected = b"public" if replacement == REQUEST[field] else None
    assert auth.verify(KEYS, value, *changed, now=NOW) == expected


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_any_header_value_is_refused_without_raising(value):
    assert auth.verify(KEYS, value, *REQUEST, now=NOW) is None
    assert not auth.cookie_valid(KEYS, REQUEST[1], b"v" * 43, value, NOW)


@settings(max_examples=100, deadline=None)
@given(key=st.binary(min_size=32, max_size=300), message=st.binary(max_size=300))
def test_macs_are_hmac_sha256_for_keys_of_any_length(key, message):
    # The keys' pads are hashed once (RFC 2104): the result must be the standard HMAC, for keys
    # shorter and longer than SHA-256's 64-byte block.
    import base64
    import hashlib
    import hmac

    expected = base64.urlsafe_b64encode(hmac.new(key, message, hashlib.sha256).digest()).rstrip(b"=")
    keys = auth.FleetKeys([key])
    assert keys.mac(message) == expected
    assert keys.valid(message, expected) and auth.FleetKeys([OTHER, key]).valid(message, expected)
    assert not auth.FleetKeys([OTHER]).valid(message, expected) or key == OTHER
