"""
A deadline uvicorn does not have: it closes a keep-alive connection that idles between requests, but a
connection that opens and sends nothing, or only part of its headers, stays open forever, holding a
socket and its buffers. TimedH11Protocol gives every request header_timeout seconds, from the
connection's start or the previous response's end, to deliver its headers; then the connection is
closed. The body's deadline is the app's (serving/app.py), idle keep-alive is uvicorn's own.
"""

from uvicorn.protocols.http.h11_impl import H11Protocol


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

    def _arm_header_deadline(self):
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_overdue)

    def _headers_overdue(self):
        """No request is being answered (none began, or the last one is done): the next one's headers are late."""
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()
