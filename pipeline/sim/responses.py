"""Small HTTP helpers every dialect shares: JSON bodies, and cutting a connection mid-answer."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from aiohttp import web

_JSON = "application/json"


def dumps(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def json_response(
    body: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(body=dumps(body), status=status, headers=headers, content_type=_JSON)


async def cut(
    request: web.Request, body: bytes, *, send: int, content_type: str = _JSON, status: int = 200
) -> web.StreamResponse:
    """Announce ``len(body)`` bytes, send only ``send`` of them, then drop the connection.

    This is what a client sees when a load balancer or the network dies mid-response: the
    status line and headers arrived, the body did not finish, and the socket is gone.
    """
    resp = web.StreamResponse(status=status)
    resp.content_type = content_type
    resp.content_length = len(body)
    resp.force_close()
    await resp.prepare(request)
    if send > 0:
        await resp.write(body[:send])
    transport = request.transport
    if transport is not None:
        transport.abort()
    return resp


def is_loopback(peer: str | None) -> bool:
    """Whether a peer address is this machine (IPv4, IPv6, or IPv4-mapped IPv6)."""
    if not peer:
        return False
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def is_loopback_host(host: str) -> bool:
    """Whether a URL host names this machine: a loopback literal or ``localhost``."""
    host = host.strip("[]").lower()
    return host == "localhost" or host.endswith(".localhost") or is_loopback(host)
