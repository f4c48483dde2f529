"""
What nanochat adds to uvicorn's server: deadlines on connections and on shutdown.

uvicorn closes a keep-alive connection that idles between requests, but a connection that opens and
sends nothing, or only part of its headers, stays open forever, holding a socket and its buffers.
TimedH11Protocol gives every request header_timeout seconds, from the connection's start or the previous
response's end, to deliver its headers; then the connection is closed. The body's deadline is the app's
(serving/app.py), idle keep-alive is uvicorn's own. A request the HTTP parser rejects (a malformed
Content-Length, say) gets a 400 in OpenAI's error shape, like every other error.

uvicorn's shutdown waits for every open response however long it streams, and only a second SIGINT (not
SIGTERM) forces it. GracefulServer calls on_first_signal (the app refuses new requests, ends queued ones,
and ends running streams with an error event after its deadline) and exits at once on any second signal.
"""

import json
import logging

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from nanochat.serving.protocol import error_body

logger = logging.getLogger("nanochat.serving")


class TimedH11Protocol(H11Protocol):
    def __init__(self, *args, header_timeout=10.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._header_deadline = None  # asyncio.TimerHandle

    def connection_made(self, transport):
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_response_complete(self):
        super().on_response_complete()
        self._arm_header_deadline()

    def connection_lost(self, exc):
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg):
        """A request the HTTP parser rejects (e.g. a malformed Content-Length): OpenAI's error shape, then close."""
        body = json.dumps(error_body("malformed HTTP request (a bad request line, header or Content-Length)",
                                     "invalid_request_error", code="bad_http_request")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _arm_header_deadline(self):
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_overdue)

    def _headers_overdue(self):
        """No request is being answered (none began, or the last one is done): the next one's headers are late."""
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()


class GracefulServer(uvicorn.Server):
    def __init__(self, config, on_first_signal):
        super().__init__(config)
        self.on_first_signal = on_first_signal

    def handle_exit(self, sig, frame):
        if self.should_exit:
            logger.warning("second signal: exiting now, open streams are cut")
            self.force_exit = True
            return
        self.should_exit = True  # uvicorn stops listening and waits for the open responses
        self.on_first_signal()
