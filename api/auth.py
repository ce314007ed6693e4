"""Who may call the API: a bearer key (and an admin key for loading models), and where it may listen."""
from __future__ import annotations

import hmac

from fastapi import Request

from api.errors import ApiError
from web.guard import is_loopback
from web.throttle import FailureThrottle, client_address


class ApiConfigError(ValueError):
    """The API settings are unsafe or contradictory; the message says which flag fixes it."""


def check_exposure(host: str, api_key: str | None) -> None:
    """Anyone who can reach a keyless API can use the model: beyond loopback a key is mandatory."""
    if not is_loopback(host) and not api_key:
        raise ApiConfigError(f"the API would listen on {host} without a key: pass --api-key KEY (or drop "
                             "--listen to keep it on 127.0.0.1)")


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _same(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class KeyCheck:
    """api_key guards every route; admin_key (defaults to api_key) guards loading and unloading models.
    With no keys at all (loopback only, see check_exposure) everything is open, as the UI is, except what
    would let a caller run code or redirect chats (see require_configured_admin). Wrong keys are throttled
    per client address (web/throttle.py)."""

    def __init__(self, api_key: str | None, admin_key: str | None):
        self.api_key = api_key or None
        self.admin_key = admin_key or self.api_key
        self.throttle = FailureThrottle("API key")

    async def require_user(self, request: Request) -> None:
        if self.api_key is None:
            return
        token = bearer_token(request)
        if token is None:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY' (the key given to --api-key)",
                           code="invalid_api_key")
        async with self.throttle.attempt(client_address(request.scope)) as attempt:
            if not (_same(token, self.api_key) or (self.admin_key and _same(token, self.admin_key))):
                attempt.failed()
                raise ApiError(401, "incorrect API key", code="invalid_api_key")
            attempt.succeeded()

    async def require_admin(self, request: Request) -> None:
        if self.admin_key is None:
            return
        token = bearer_token(request)
        if token is None:
            raise ApiError(401, "missing admin key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
        async with self.throttle.attempt(client_address(request.scope)) as attempt:
            if _same(token, self.admin_key):
                attempt.succeeded()
                return
            if self.api_key and _same(token, self.api_key):
                attempt.succeeded()   # a valid key, just not this one: no guess to slow down
                raise ApiError(403, "this key may generate but not load or unload models: use the admin key",
                               code="admin_key_required")
            attempt.failed()
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    async def require_configured_admin(self, request: Request, what: str) -> None:
        """`what` (a loader that sends chats elsewhere, an option that runs a model's code) needs the admin key,
        and so an admin key must exist: a keyless API on loopback can be reached by any local program."""
        if self.admin_key is None:
            raise ApiError(403, f"{what} can be set over the API only with an admin key: start Hearth with "
                                "--api-admin-key KEY and send it as 'Authorization: Bearer KEY', or load the model "
                                "in the UI", code="admin_key_required")
        await self.require_admin(request)
