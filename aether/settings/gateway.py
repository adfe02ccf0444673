"""The settings of ``aether gateway``, each from its flag, its ``AETHER_*`` variable or its
default (see ``table``; a gateway reads no ``config.json``), checked together: a Redis URL, a
fleet key that can be used, a metrics token that is not empty."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from aether.settings import sources
from aether.settings.table import GATEWAY

if TYPE_CHECKING:
    import argparse

    from aether.fleet.auth import FleetKeys


@dataclasses.dataclass
class GatewaySettings:
    host: str
    port: int
    redis: str
    preview_domain: str
    keys: FleetKeys = dataclasses.field(repr=False)
    trusted_proxies: tuple = ()
    max_connections: int = 10000
    max_unauthenticated_per_address: int = 128
    preview_timeout: float = 60.0
    reload_interval: float = 300.0
    liveness_interval: float = 0.1
    metrics_public: bool = False
    metrics_token: str | None = dataclasses.field(default=None, repr=False)


def add_commands(commands) -> None:
    """``aether gateway`` and its flags (the gateway itself is imported only when it runs)."""
    parser = commands.add_parser("gateway", help="fleet mode: route the fleet's preview hosts to their VMs")
    sources.add_flags(
        parser,
        GATEWAY,
        help={
            "max_connections": "connections at once, previews and the gateway's own endpoints alike; past it a new one "
            "is closed at once; at least 1",
            "trusted_proxies": "addresses or networks of a TLS front whose X-Forwarded-For, -Proto and -Port the gateway "
            "believes and passes on",
            "fleet_redis": "the fleet's Redis: redis://HOST:PORT/DB, rediss://..., unix:///PATH or "
            "redis+sentinel://H1:P1,H2:P2/MASTER/DB",
            "metrics_public": "serve GET /metrics without a token",
            "fleet_key_file": "the fleet key, the same file as its VMs' (at least 32 bytes, mode 0600); NEW,OLD while rotating",
        },
    )


def resolve(args: argparse.Namespace) -> GatewaySettings:
    """The gateway's settings; ValueError naming a bad or missing one."""
    from aether.fleet import auth, connection

    def value(name: str):
        return sources.value(name, getattr(args, name, None), GATEWAY)

    redis = value("fleet_redis")
    if not redis:
        raise ValueError("aether gateway needs --redis URL (or AETHER_FLEET_REDIS)")
    connection.check(redis)
    key_file = value("fleet_key_file")
    if not key_file:
        raise ValueError("aether gateway needs --fleet-key-file (or AETHER_FLEET_KEY_FILE): the fleet key its VMs have")
    keys = auth.FleetKeys.load(key_file)
    token = None
    token_file = value("gateway_metrics_token_file")
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as file:
                token = file.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"metrics token file {token_file}: {getattr(exc, 'strerror', None) or exc}") from None
        if not token:
            raise ValueError(f"metrics token file {token_file} is empty")
    return GatewaySettings(
        host=value("gateway_host"),
        port=value("gateway_port"),
        redis=redis,
        preview_domain=value("preview_domain"),
        keys=keys,
        trusted_proxies=value("trusted_proxies"),
        max_connections=value("max_connections"),
        max_unauthenticated_per_address=value("max_unauthenticated_per_address"),
        preview_timeout=value("preview_timeout"),
        reload_interval=value("gateway_reload_interval"),
        liveness_interval=value("gateway_liveness_interval"),
        metrics_public=bool(value("metrics_public")),
        metrics_token=token,
    )
