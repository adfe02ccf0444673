"""The fleet key and what it proves: workspace token verifiers, gateway cookies, and the
signature on every request a gateway forwards to a VM. No I/O except reading the key file.

One key file, the same on every VM and gateway, holds a secret of at least 32 bytes. Every MAC
here is HMAC-SHA256 under it, over a message with its own label, in base64url without padding
(43 characters). ``--fleet-key-file new,old`` rotates: the first key signs, every key verifies.

- **Verifier**: ``HMAC(key, "aether-fleet-verifier\\0" prefix "\\0" token)``, what a VM
  publishes instead of its token. Keyed with the fleet key (not with the token itself) so that
  whoever reads Redis, or a backup of it, cannot test guesses of a weak token offline.
- **Cookie** ``aether_fleet=EXPIRY.MAC`` for one preview host name, ``MAC = HMAC(key,
  "aether-fleet-cookie\\0" host "\\0" EXPIRY "\\0" verifier)``: a gateway checks it without a
  lookup; it opens that host only, until EXPIRY, and a new token on the VM (a new verifier)
  voids it.
- **Signature** ``X-Aether-Fleet: v1 t=UNIX a=ACCESS s=MAC`` over the request's method, Host,
  target and the ``X-Forwarded-*`` values the gateway set, ``ACCESS`` saying what admitted the
  request (``public``, ``token`` or ``cookie``). A VM believes it within ``WINDOW`` seconds.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import os
import re
import stat
import time
from collections.abc import Sequence

MIN_KEY_BYTES = 32
#: A key file is a secret, not a document: anything longer is the wrong file.
MAX_KEY_BYTES = 4096
COOKIE = b"aether_fleet"
COOKIE_TTL = 12 * 3600
HEADER = b"X-Aether-Fleet"
#: Seconds a signature stays good either way: room for clocks NTP keeps within a second or so.
WINDOW = 60
ACCESS = (b"public", b"token", b"cookie")
_SIGNATURE = re.compile(rb"v1 t=([1-9][0-9]{0,11}) a=(public|token|cookie) s=([A-Za-z0-9_-]{43})\Z")


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names it and says what to do."""


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64(digest: bytes) -> bytes:
    # binascii's, not base64.urlsafe_b64encode (two Python calls more, for every request signed).
    return binascii.b2a_base64(digest, newline=False).translate(_URLSAFE).rstrip(b"=")


def read_key(path: str) -> bytes:
    """The key in ``path``: its bytes less trailing white space. Refused: a file group or others
    may read or write, one not a regular file, shorter than ``MIN_KEY_BYTES`` or absurdly long."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise KeyFileError(f"fleet key file {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)  # of the file opened, not of a name that could change meanwhile
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"fleet key file {path} is not a regular file")
        if info.st_mode & 0o066:
            raise KeyFileError(
                f"fleet key file {path} is open to group or others (mode {stat.S_IMODE(info.st_mode):04o}): chmod 600 {path}"
            )
        data = os.read(fd, MAX_KEY_BYTES + 1)
    finally:
        os.close(fd)
    key = data.rstrip(b" \t\r\n")
    if len(data) > MAX_KEY_BYTES:
        raise KeyFileError(f"fleet key file {path} is over {MAX_KEY_BYTES} bytes: not a key")
    if len(key) < MIN_KEY_BYTES:
        raise KeyFileError(
            f"fleet key file {path} holds {len(key)} bytes, fewer than {MIN_KEY_BYTES}: "
            f"make one with `openssl rand -hex 32 > {path}`"
        )
    return key


_IPAD = bytes(x ^ 0x36 for x in range(256))  # translation tables: a key XOR the inner pad
_OPAD = bytes(x ^ 0x5C for x in range(256))  # ... and the outer one


def _pads(key: bytes) -> tuple:
    """HMAC-SHA256's inner and outer hashes with ``key``'s pads taken in (RFC 2104): a MAC is
    then two copies and updates, 0.7 us, where ``hmac.new`` takes 2.0 us (it hashes the pads
    again each time), and a gateway signs each request it forwards."""
    if len(key) > 64:  # the block size: a longer key is its hash
        key = hashlib.sha256(key).digest()
    key = key.ljust(64, b"\0")
    return hashlib.sha256(key.translate(_IPAD)), hashlib.sha256(key.translate(_OPAD))


def _digest(pads: tuple, message: bytes) -> bytes:
    inner, outer = pads[0].copy(), pads[1].copy()
    inner.update(message)
    outer.update(inner.digest())
    return outer.digest()


class FleetKeys:
    """The fleet's keys: ``keys[0]`` signs, any of them verifies."""

    __slots__ = ("keys", "_pads")

    def __init__(self, keys: Sequence[bytes]):
        if not keys or any(len(key) < MIN_KEY_BYTES for key in keys):
            raise KeyFileError(f"a fleet key has at least {MIN_KEY_BYTES} bytes")
        self.keys = tuple(keys)
        self._pads = tuple(_pads(key) for key in self.keys)

    @classmethod
    def load(cls, spec: str) -> FleetKeys:
        """From ``--fleet-key-file``: ``PATH``, or ``NEW,OLD`` while rotating."""
        paths = [path.strip() for path in spec.split(",") if path.strip()]
        if not 1 <= len(paths) <= 2:
            raise KeyFileError("--fleet-key-file takes one file, or two (new,old) while rotating")
        return cls([read_key(path) for path in paths])

    def mac(self, message: bytes) -> bytes:
        return _b64(_digest(self._pads[0], message))

    def valid(self, message: bytes, mac: bytes) -> bool:
        """Whether ``mac`` is ``message``'s MAC under one of the keys."""
        return any(hmac.compare_digest(_b64(_digest(pads, message)), mac) for pads in self._pads)

    def __repr__(self) -> str:
        return f"<FleetKeys: {len(self.keys)} key(s)>"


# -- verifiers ------------------------------------------------------------------------------


def _verifier_message(token: bytes, prefix: bytes) -> bytes:
    return b"aether-fleet-verifier\0" + prefix + b"\0" + token


def verifier(keys: FleetKeys, token: str | bytes, prefix: str) -> str:
    """What a VM publishes for its ``token``: a gateway holding the key can check a token
    against it, nobody can recover the token from it."""
    token = token.encode() if isinstance(token, str) else token
    return keys.mac(_verifier_message(token, prefix.encode())).decode()


def token_matches(keys: FleetKeys, token: bytes, prefix: bytes, verifier: bytes) -> bool:
    """Whether ``token`` is the token of the workspace that published ``verifier``."""
    return bool(token) and keys.valid(_verifier_message(token, prefix), verifier)


# -- cookies --------------------------------------------------------------------------------


def _cookie_message(host_name: bytes, expiry: bytes, verifier: bytes) -> bytes:
    return b"aether-fleet-cookie\0" + host_name.lower() + b"\0" + expiry + b"\0" + verifier


def mint_cookie(keys: FleetKeys, host_name: bytes, verifier: bytes, now: float | None = None) -> bytes:
    """The cookie's value for ``host_name`` (a preview host name, no port), ``COOKIE_TTL`` long."""
    expiry = b"%d" % (int(time.time() if now is None else now) + COOKIE_TTL)
    return expiry + b"." + keys.mac(_cookie_message(host_name, expiry, verifier))


def cookie_valid(keys: FleetKeys, host_name: bytes, verifier: bytes, value: bytes, now: float | None = None) -> bool:
    return _valid_until(keys, host_name, verifier, value, now) is not None


def _valid_until(keys: FleetKeys, host_name: bytes, verifier: bytes, value: bytes, now: float | None) -> int | None:
    """The expiry of cookie ``value`` when it is valid now, else None."""
    expiry, dot, mac = value.partition(b".")
    if not dot or not expiry.isdigit() or len(expiry) > 12 or expiry.startswith(b"0") or len(mac) != 43:
        return None
    now = time.time() if now is None else now
    # Never minted further ahead than COOKIE_TTL: a longer one was not made here.
    if not now < int(expiry) <= now + COOKIE_TTL + 1:
        return None
    return int(expiry) if keys.valid(_cookie_message(host_name, expiry, verifier), mac) else None


def cookie_until(
    headers: Sequence[bytes], host_name: bytes, verifier: bytes, keys: FleetKeys, now: float | None = None
) -> int | None:
    """The expiry (UNIX seconds) of the first valid ``aether_fleet`` cookie for this host in the
    ``Cookie`` headers, or None when they hold none."""
    for header in headers:
        for pair in header.split(b";"):
            name, _, value = pair.strip().partition(b"=")
            if name == COOKIE:
                until = _valid_until(keys, host_name, verifier, value.strip(), now)
                if until is not None:
                    return until
    return None


def cookie_of(headers: Sequence[bytes], host_name: bytes, verifier: bytes, keys: FleetKeys, now: float | None = None) -> bool:
    """Whether any ``Cookie`` header holds a valid ``aether_fleet`` for this host."""
    return cookie_until(headers, host_name, verifier, keys, now) is not None


# -- request signatures ---------------------------------------------------------------------


def _request_message(
    t: bytes, access: bytes, method: bytes, host: bytes, target: bytes, forwarded_for: bytes, proto: bytes, port: bytes
) -> bytes:
    return b"\n".join((b"v1", t, access, method, host, target, forwarded_for, proto, port))


class Signer:
    """Signs requests alike in all but their target and time: those a gateway forwards for one
    browser connection (the same access, method, Host and ``X-Forwarded-*``). The fixed part of
    the message is joined once."""

    __slots__ = ("keys", "access", "_middle", "_end")

    def __init__(
        self, keys: FleetKeys, access: bytes, method: bytes, host: bytes, forwarded_for: bytes, proto: bytes, port: bytes
    ):
        self.keys = keys
        self.access = access
        self._middle = b"\n" + access + b"\n" + method + b"\n" + host + b"\n"
        self._end = b"\n" + forwarded_for + b"\n" + proto + b"\n" + port

    def sign(self, target: bytes, second: int) -> bytes:
        """The ``X-Aether-Fleet`` value for ``target`` at UNIX time ``second``."""
        t = b"%d" % second
        mac = self.keys.mac(b"v1\n" + t + self._middle + target + self._end)
        return b"v1 t=" + t + b" a=" + self.access + b" s=" + mac


def sign(
    keys: FleetKeys,
    access: bytes,
    method: bytes,
    host: bytes,
    target: bytes,
    forwarded_for: bytes,
    proto: bytes,
    port: bytes,
    now: float | None = None,
) -> bytes:
    """The ``X-Aether-Fleet`` value for a request forwarded with these ``Host``, target and
    ``X-Forwarded-For``/``-Proto``/``-Port`` values, admitted by ``access``."""
    return Signer(keys, access, method, host, forwarded_for, proto, port).sign(target, int(time.time() if now is None else now))


def verify(
    keys: FleetKeys,
    value: bytes,
    method: bytes,
    host: bytes,
    target: bytes,
    forwarded_for: bytes,
    proto: bytes,
    port: bytes,
    now: float | None = None,
) -> bytes | None:
    """What admitted a request signed ``value`` (``public``, ``token`` or ``cookie``), or None
    when the signature is not a gateway's for exactly this request within ``WINDOW`` s."""
    match = _SIGNATURE.match(value.strip())
    if match is None:
        return None
    t, access, mac = match.groups()
    now = time.time() if now is None else now
    if abs(int(t) - now) > WINDOW:
        return None
    if not keys.valid(_request_message(t, access, method, host, target, forwarded_for, proto, port), mac):
        return None
    return access


def verify_head(keys: FleetKeys, method: bytes, target: bytes, head, now: float | None = None) -> bytes | None:
    """For a VM: what admitted a request whose head (an :class:`aether.preview.headers.RequestHead`)
    a gateway signed, or None. The ``X-Aether-Fleet`` lines are taken out of ``head.lines`` either
    way, so they never reach the app; more than one is no signature."""
    prefix = HEADER.lower() + b":"
    found = [line for line in head.lines if line[: len(prefix)].lower() == prefix]
    if not found:
        return None
    head.lines = [line for line in head.lines if line[: len(prefix)].lower() != prefix]
    if len(found) != 1 or len(head.hosts) != 1:
        return None
    value = found[0][len(prefix) :].strip()
    return verify(keys, value, method, head.hosts[0], target, head.forwarded_for, head.forwarded_proto, head.forwarded_port, now)
