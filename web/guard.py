"""Host and Origin checks in front of a web server, so that no web page can drive Hearth.

A page on any site can make the user's browser send requests to 127.0.0.1: a cross-site POST carries that
page's `Origin`, and a DNS-rebinding page (a name of the attacker's that now resolves to 127.0.0.1) sends its
own name as `Host` and counts as same-origin. So every request is refused (403, before any work) unless its
Host names this server (loopback, the bound address, or a name the user allowed) and its Origin, when a
browser sends one, is the server's own or one the user allowed. Clients that are not browsers send no
Origin and are unaffected.
"""
from __future__ import annotations

import fnmatch
import ipaddress
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)

WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    if host.rstrip(".").lower() == "localhost":
        return True
    ip = _ip(host)
    return ip is not None and ip.is_loopback   # another name may resolve to anything: treat it as public


def host_name(host_header: str) -> str:
    """'[::1]:7860' -> '::1', 'Box.Local.:80' -> 'box.local'."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def normalize_host(entry: str) -> str:
    """An --allowed-hosts entry: a bare name or address (no scheme, no port); ValueError says what is wrong."""
    name = entry.strip().lower().rstrip(".")
    if not name or "/" in name or (":" in name and _ip(name.strip("[]")) is None) or " " in name:
        raise ValueError(f"allowed host {entry!r} must be a bare host name or address (no scheme, port or path), "
                         "e.g. mybox.local")
    return name.strip("[]")


def normalize_origin(entry: str) -> str:
    """A --cors-origins entry: 'scheme://host[:port]', 'null', or a pattern with '*' (e.g. http://localhost:*)."""
    origin = entry.strip().lower().rstrip("/")
    if origin in ("null", "*"):
        return origin
    parts = urlsplit(origin)
    if not parts.scheme or not parts.netloc or parts.path or parts.query or parts.fragment:
        raise ValueError(f"CORS origin {entry!r} must look like http://host[:port] (what browsers send as "
                         "Origin: a scheme and a host, no path), 'null', or a pattern such as http://localhost:*")
    return origin


@dataclass(frozen=True)
class OriginPolicy:
    """Which Host and Origin headers a server on `bound_host` answers; the lists are already normalized."""
    bound_host: str
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()

    @classmethod
    def build(cls, bound_host: str, allowed_hosts: Iterable[str] = (),
              cors_origins: Iterable[str] = ()) -> "OriginPolicy":
        return cls(host_name(bound_host), tuple(normalize_host(h) for h in allowed_hosts),
                   tuple(normalize_origin(o) for o in cors_origins))

    def host_allowed(self, host_header: str) -> bool:
        name = host_name(host_header)
        if not name:   # HTTP/1.0 clients may omit Host; browsers never do
            return True
        if is_loopback(name) or name == self.bound_host or name in self.allowed_hosts:
            return True
        # Bound to every interface, clients reach it through any address of this machine (or a port
        # forwarded to it). An address cannot be re-pointed by DNS, so only names need allowing.
        return self.bound_host in WILDCARD_HOSTS and _ip(name) is not None

    def cors_allowed(self, origin: str) -> bool:
        return any(fnmatch.fnmatchcase(origin.lower(), pattern) for pattern in self.cors_origins)

    def origin_allowed(self, origin: str, host_header: str) -> bool:
        parts = urlsplit(origin.lower())
        own = parts.scheme in ("http", "https") and parts.netloc == host_header.strip().lower()
        return own or self.cors_allowed(origin)

    def problem(self, host_header: str, origin: str | None) -> str | None:
        """Why a request with these headers is refused, or None when it may proceed."""
        if not self.host_allowed(host_header):
            return (f"Host {host_header!r} does not name this server; if you reach Hearth by that name, start it "
                    f"with --allowed-hosts {host_name(host_header)}")
        if origin is not None and not self.origin_allowed(origin, host_header):
            return (f"a page from {origin!r} may not use this server; to allow it, start Hearth with "
                    f"--cors-origins {origin}")
        return None

    def cors_regex(self) -> str | None:
        """The allow-listed origins as one regex, for Starlette's CORSMiddleware (None: allow none)."""
        if not self.cors_origins:
            return None
        return "|".join(fnmatch.translate(p) for p in self.cors_origins)


def plain_refusal(status: int, message: str) -> Response:
    return PlainTextResponse(message + "\n", status_code=status)


class WebGuard:
    """ASGI middleware: refuses (403) requests and websockets whose Host or Origin the policy does not allow.
    It must be the outermost layer, so that nothing behind it (CORS answers included) runs for them."""

    def __init__(self, app: ASGIApp, policy: OriginPolicy,
                 refuse: Callable[[int, str], Response] = plain_refusal):
        self.app, self.policy, self.refuse = app, policy, refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        problem = self.policy.problem(headers.get("host", ""), headers.get("origin"))
        if problem is None:
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("unknown",))[0]
        log.warning("refused %s %s from %s: %s", scope.get("method", "WEBSOCKET"), scope.get("path"), client,
                    problem)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})   # before accept: the server answers 403
            return
        await self.refuse(403, problem)(scope, receive, send)


def guard_middleware(policy: OriginPolicy, refuse: Callable[[int, str], Response] = plain_refusal, *,
                     credentials: bool) -> list[Middleware]:
    """The middleware list for a Starlette/FastAPI app, outermost first: the guard, then CORS answers
    (preflights included) for the allow-listed origins only. `credentials`: the app uses cookies."""
    regex = policy.cors_regex()
    return [Middleware(WebGuard, policy=policy, refuse=refuse),
            Middleware(CORSMiddleware, allow_origins=[], allow_origin_regex=regex and f"(?i:{regex})",
                       allow_methods=["*"], allow_headers=["*"], allow_credentials=credentials, max_age=600)]

