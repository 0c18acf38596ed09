"""The HTTP/1.1 protocol `dailyplay serve` runs: uvicorn's httptools one, with a bound on a
request's head.

httptools parses HTTP in C and doubles validate-session's req/s against uvicorn's pure-Python
h11 (docs/performance.md). h11 refuses a request line and headers over 16 KiB; httptools takes
headers of any size (20 MB were accepted in a test), buffering them all, so every connection
could make the server hold as much as a client cares to send. This keeps h11's bound:
- the request line and headers, as parsed, may be at most MAX_HEAD_BYTES (exactly);
- bytes received while a head is still incomplete are counted, so a head that never ends is
  refused once MAX_HEAD_BYTES have arrived (memory held: that, plus at most one read).
A head over the bound is answered 431 in the API's JSON error shape, with a new X-Request-ID,
and the connection closed.
"""

from __future__ import annotations

import logging

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .logs import new_request_id
from .responses import JsonResponse

log = logging.getLogger("dailyplay")

# As h11's default maximum for an incomplete event (its request line and headers).
MAX_HEAD_BYTES = 16 * 1024

_TOO_LARGE = JsonResponse(
    {
        "success": False,
        "error": f"the request line and headers are over {MAX_HEAD_BYTES // 1024} KiB",
    },
    status_code=431,
).body


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's HttpToolsProtocol with MAX_HEAD_BYTES (see the module's text)."""

    # Bytes received since the head now being read began, counted only until it is complete.
    _head_bytes = 0
    _in_head = True
    # A head over the bound was parsed: the parser's further callbacks on this connection are
    # ignored, and the answer goes out once the read that held it has been fed.
    _refused = False

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # A read that completes a head may carry a body, so only a head still incomplete after
        # this read is judged by the bytes received.
        if self._refused or (self._in_head and self._head_bytes > MAX_HEAD_BYTES):
            self._refuse()

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_head = False
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > MAX_HEAD_BYTES:
            self._refused = True
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        # Whatever comes next on this connection is the next request's head.
        self._in_head = True
        self._head_bytes = 0
        super().on_message_complete()

    def _refuse(self) -> None:
        self._refused = True
        if self.transport.is_closing():
            return
        client = self.client[0] if self.client else "unknown"
        request_id = new_request_id()  # every answer has one (the log layer never saw this)
        log.warning(
            "refused a request from %s (request id %s): its head is over %d bytes",
            client, request_id, MAX_HEAD_BYTES,
        )  # fmt: skip
        self.transport.write(
            b"".join(
                [
                    STATUS_LINE[431],
                    b"content-type: application/json\r\n",
                    b"x-request-id: " + request_id.encode("ascii") + b"\r\n",
                    b"content-length: " + str(len(_TOO_LARGE)).encode("ascii") + b"\r\n",
                    b"connection: close\r\n\r\n",
                    _TOO_LARGE,
                ]
            )
        )
        self.transport.close()
