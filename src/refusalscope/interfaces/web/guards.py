"""Request guards of the web app, as plain ASGI middleware: a cap on body size, a same-origin
rule for requests that change state (annotations, playground), and security headers on every
response. The app binds 127.0.0.1 by default; these keep other sites in the user's own browser
from driving it (cross-site form posts, DNS rebinding is handled by the trusted-host check)."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

SAFE = {"GET", "HEAD", "OPTIONS"}
CSP = ("default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


async def _reply(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Guards:
    """Reject bodies over `max_body` bytes (413) and cross-origin state-changing requests (403);
    add security headers (CSP without inline script, nosniff, no framing, no referrer leaks)."""

    def __init__(self, app, max_body: int = 64 * 1024):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["method"] not in SAFE:
            why = cross_origin(headers)
            if why:
                return await _reply(send, 403, f"cross-origin request refused ({why}): use the app's own pages")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _reply(send, 413, f"request body over {self.max_body} bytes: send less")
        body, more = b"", True
        while more:  # buffer the (small) body so a chunked upload cannot slip past the cap
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.max_body:
                return await _reply(send, 413, f"request body over {self.max_body} bytes: send less")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def with_headers(msg):
            if msg["type"] == "http.response.start":
                extra = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                         (b"x-frame-options", b"DENY"), (b"referrer-policy", b"same-origin")]
                msg = {**msg, "headers": list(msg.get("headers", [])) + extra}
            await send(msg)

        await self.app(scope, replay, with_headers)


def cross_origin(headers: dict[str, str]) -> str | None:
    """Why a state-changing request is cross-origin, or None when it is same-origin (or comes
    from a non-browser client that sends neither Origin nor Referer nor Sec-Fetch-Site)."""
    host = headers.get("host", "")
    if headers.get("sec-fetch-site") == "cross-site":
        return "Sec-Fetch-Site: cross-site"
    origin = headers.get("origin")
    if origin is not None:
        if origin == "null" or urlsplit(origin).netloc != host:
            return f"Origin {origin!r} is not {host!r}"
        return None
    referer = headers.get("referer")
    if referer and urlsplit(referer).netloc != host:
        return f"Referer from another site than {host!r}"
    return None
