"""
Which browsers' requests the server answers. Without API keys the server listens on loopback only, but a
browser on that machine is a way in: a page from any site can POST to http://127.0.0.1:8000 (the reply
is unreadable to it, but the model generates), and a DNS-rebinding name (evil.example resolving to
127.0.0.1) makes such a page same-origin. So:
- a server bound to a loopback address answers only requests whose Host is a loopback name;
- a request with an Origin header (what browsers send cross-site) is refused unless that origin is the
  server itself or one of --cors-origins; Starlette's CORSMiddleware adds the CORS headers for those.
Refusals are OpenAI-shaped 403s, sent before the app runs.
"""

import ipaddress
import json
from urllib.parse import urlsplit

from nanochat.serving.protocol import error_body


def is_loopback(host):
    """host: a name or address without port ("localhost", "127.0.0.1", "::1")."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _hostname(host_header):
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1'; None if it does not parse."""
    try:
        return urlsplit(f"//{host_header}").hostname
    except ValueError:
        return None


def refusal(headers, bound_host, cors_origins):
    """(code, message) when this request must be refused, else None. headers: lower-case name -> value."""
    host = headers.get("host", "")
    if is_loopback(bound_host) and not is_loopback(_hostname(host) or ""):
        return "host_not_allowed", (f"Host {host!r} is not this server: it listens on {bound_host} and answers "
                                    "loopback names only (a DNS-rebinding page would use another name)")
    origin = headers.get("origin")
    if origin is None or origin in cors_origins or "*" in cors_origins:
        return None
    if origin in (f"http://{host}", f"https://{host}"):  # the server's own page (the chat UI)
        return None
    return "origin_not_allowed", (f"cross-origin requests from {origin!r} are refused; allow that origin with "
                                  "--cors-origins if it should use this server from a browser")


class OriginGuard:
    """ASGI middleware: answers a refused HTTP request with a 403 itself; everything else passes through."""

    def __init__(self, app, bound_host, cors_origins=()):
        self.app, self.bound_host, self.cors_origins = app, bound_host, set(cors_origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
            refused = refusal(headers, self.bound_host, self.cors_origins)
            if refused is not None:
                body = json.dumps(error_body(refused[1], "invalid_request_error", code=refused[0])).encode()
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
