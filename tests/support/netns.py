"""Other hosts for a test: a network namespace with a veth pair to this one, names and subnet
unique to it, removed afterwards.

A host's side is ``NET.1/24`` here and ``NET.2/24`` in the namespace, ``NET`` a /24 of
198.18.0.0/15 (set aside for tests of networks) that no interface here has yet. Processes go in
with ``nsenter --net=`` (:attr:`Host.wrap`), not ``ip netns exec``: that one remounts /sys,
which hides tracefs from the eBPF probe.
"""

from __future__ import annotations

import os
import subprocess

import pytest


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def _free_net() -> tuple[str, str]:
    used = ip("-o", "-4", "addr", "show").stdout
    for _ in range(64):
        tag = os.urandom(4).hex()
        n = int(tag, 16) % 512
        net = f"198.{18 + n // 256}.{n % 256}"
        if f" {net}." not in used:
            return tag, net
    raise AssertionError("no free /24 in 198.18.0.0/15")


class Host:
    """A namespace ``ns`` reached over ``here`` (this side, ``NET.1``) and ``there`` (its
    side, ``NET.2``); :meth:`remove` takes it all away."""

    def __init__(self):
        if os.geteuid() != 0:
            pytest.skip("network namespaces need root")
        self.tag, self.net = _free_net()
        self.ns, self.here, self.there = f"aether-{self.tag}", f"ae{self.tag}h", f"ae{self.tag}t"
        ip("netns", "add", self.ns)
        try:
            ip("link", "add", self.here, "type", "veth", "peer", "name", self.there, "netns", self.ns)
            ip("addr", "add", f"{self.net}.1/24", "dev", self.here)
            ip("link", "set", self.here, "up")
            ip("-n", self.ns, "link", "set", "lo", "up")
            ip("-n", self.ns, "addr", "add", f"{self.net}.2/24", "dev", self.there)
            ip("-n", self.ns, "link", "set", self.there, "up")
        except BaseException:
            self.remove()
            raise

    @property
    def address(self) -> str:
        """The host's own address, as this namespace reaches it."""
        return f"{self.net}.2"

    @property
    def gateway(self) -> str:
        """This namespace's address, as the host reaches it."""
        return f"{self.net}.1"

    @property
    def wrap(self) -> tuple[str, ...]:
        """The command prefix that runs a command inside the host."""
        return ("nsenter", f"--net=/run/netns/{self.ns}")

    def link(self, up: bool) -> None:
        """Take the host's link down (its packets go nowhere) or bring it back."""
        ip("link", "set", self.here, "up" if up else "down")
        if up:
            ip("-n", self.ns, "link", "set", self.there, "up")

    def remove(self) -> None:
        ip("link", "del", self.here, check=False)
        ip("netns", "del", self.ns, check=False)
