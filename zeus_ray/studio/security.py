"""Who may talk to the studio.

- Bound to 127.0.0.1 by default. On any other address a token is required (printed once at start,
  as Jupyter does): the first visit carries `?token=…`, which sets an HTTP-only cookie; API clients
  may send `Authorization: Bearer …` instead.
- The Host header must name the studio (a DNS-rebinding page cannot reach a local studio).
- Requests that change anything (POST) must carry the `X-Zeus-Studio` header: a page on another
  origin cannot add it without a CORS preflight, which the studio never grants.
"""
from __future__ import annotations

import ipaddress
import secrets
from http.cookies import SimpleCookie
from urllib.parse import urlencode

from starlette.datastructures import Headers, QueryParams
from starlette.responses import PlainTextResponse, RedirectResponse

COOKIE = "zeus_studio_token"
WRITE_HEADER = "x-zeus-studio"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(24)


def _cookie_name(scope) -> str:
    """One cookie per port: browsers share cookies across the ports of a host, studios must not."""
    server = scope.get("server") or (None, None)
    return f"{COOKIE}_{server[1]}" if server[1] else COOKIE


class StudioGuard:
    """ASGI middleware: the token (when set) and the write header, on every HTTP request."""

    def __init__(self, app, token: str | None):
        self.app, self.token = app, token

    def _token_ok(self, given: str | None) -> bool:
        return bool(given) and secrets.compare_digest(given.encode(), self.token.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if self.token is not None:
            query = QueryParams(scope.get("query_string", b"").decode("latin-1"))
            cookie = SimpleCookie(headers.get("cookie", ""))
            name = _cookie_name(scope)
            bearer = headers.get("authorization", "")
            if self._token_ok(query.get("token")) and scope["method"] == "GET":
                # Trade the token in the address for a cookie, and drop it from the address bar.
                rest = urlencode([(k, v) for k, v in query.multi_items() if k != "token"])
                resp = RedirectResponse(scope["path"] + (f"?{rest}" if rest else ""), status_code=303)
                resp.set_cookie(name, self.token, httponly=True, samesite="strict")
                return await resp(scope, receive, send)
            ok = (name in cookie and self._token_ok(cookie[name].value)) or \
                (bearer.startswith("Bearer ") and self._token_ok(bearer[7:]))
            if not ok:
                resp = PlainTextResponse("zeus studio: open the address with ?token=… printed when the studio "
                                         "started (or send Authorization: Bearer TOKEN)", status_code=401)
                return await resp(scope, receive, send)
        if scope["method"] not in ("GET", "HEAD") and headers.get(WRITE_HEADER) != "1":
            resp = PlainTextResponse(f"zeus studio: requests that change anything need the {WRITE_HEADER} header",
                                     status_code=403)
            return await resp(scope, receive, send)
        return await self.app(scope, receive, send)
