"""A pass-through proxy in front of the S3 server that records every request it relays.

`CountingProxy` is the fault proxy (tests/s3proxy.py: `arm` still works) whose untouched
connections are watched on their way through: each HTTP/1.1 request and its answer become one
`Request` (method, target, status, body bytes up and down). Bodies are counted, never buffered, so
the proxy costs a copy of each chunk and nothing per byte. `take()` hands over the requests
recorded since the last call, so a caller can attribute them to the command it ran in between.
"""

from __future__ import annotations

import socket
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

from s3proxy import FaultProxy, _reset

# What the body of a message is delimited by: a length, chunked transfer coding, or the close of
# the connection (an answer without either).
CHUNKED = -1
TO_CLOSE = -2


@dataclass
class Request:
    method: str
    target: str  # as sent: path (percent-encoded) and query
    status: int = 0  # 0: the connection closed before the answer ended
    bytes_up: int = 0  # request body
    bytes_down: int = 0  # answer body

    @property
    def path(self) -> str:
        return unquote(urlsplit(self.target).path)

    @property
    def query(self) -> dict[str, str]:
        return dict(parse_qsl(urlsplit(self.target).query, keep_blank_values=True))


class CountingProxy(FaultProxy):
    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self._done: list[Request] = []

    def take(self) -> list[Request]:
        """The requests answered (or cut) since the last call, in the order they ended."""
        with self._lock:
            done, self._done = self._done, []
        return done

    def _serve(self, client: socket.socket, fault: str | None) -> None:
        if fault is not None:
            return super()._serve(client, fault)
        upstream = socket.create_connection(self.target)
        with self._lock:
            self._open.add(upstream)
        connection = _Connection(self)
        requests = _Messages(connection.request_head, connection.request_end)
        answers = _Messages(connection.answer_head, connection.answer_end)
        threading.Thread(target=_relay, args=(client, upstream, requests), daemon=True).start()
        _relay(upstream, client, answers)
        self._record(*connection.sent)  # cut before their answers ended

    def _record(self, *requests: Request) -> None:
        with self._lock:
            self._done += requests


class _Connection:
    """Pairs the requests of one connection with their answers (HTTP/1.1: in order)."""

    def __init__(self, proxy: CountingProxy) -> None:
        self.proxy = proxy
        self.sent: deque[Request] = deque()  # still waiting for their answers
        self.current: Request | None = None  # the request whose body is passing

    def request_head(self, head: bytes) -> int:
        method, target, _ = head.split(b" ", 2)
        self.current = Request(method.decode(), target.decode())
        self.sent.append(self.current)
        return _framing(head, 0)

    def request_end(self, size: int) -> None:
        self.current.bytes_up = size

    def answer_head(self, head: bytes) -> int | None:
        status = int(head.split(b" ", 2)[1])
        if 100 <= status < 200:
            return None  # an interim answer (100 Continue): the final one follows
        request = self.sent[0]
        request.status = status
        if request.method == "HEAD" or status in (204, 304):
            return 0
        return _framing(head, TO_CLOSE)

    def answer_end(self, size: int) -> None:
        request = self.sent.popleft()
        request.bytes_down = size
        self.proxy._record(request)


def _framing(head: bytes, default: int) -> int:
    """How the body after this head is delimited (a length, CHUNKED or TO_CLOSE)."""
    length = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding" and value.strip().lower().endswith(b"chunked"):
            return CHUNKED
        if name == b"content-length":
            length = int(value)
    return default if length is None else length


def _relay(source: socket.socket, sink: socket.socket, messages: _Messages) -> None:
    """Forward one direction; each chunk is parsed before it is sent on, so a request is known
    before its answer can come back."""
    try:
        while chunk := source.recv(65536):
            messages.feed(chunk)
            sink.sendall(chunk)
        messages.closed()
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        _reset(sink)


class _Messages:
    """One direction of an HTTP/1.1 connection, split into messages as its bytes pass.

    `on_head(head)` returns the body's framing, or None for a message without a body that is not
    reported (an interim answer); `on_end(body_bytes)` reports a message's end."""

    def __init__(self, on_head: Callable[[bytes], int | None],
                 on_end: Callable[[int], None]) -> None:
        self.on_head = on_head
        self.on_end = on_end
        self.buffer = b""  # an unfinished head, chunk-size line or trailer
        self.state = "head"
        self.remaining = 0  # body bytes (or chunk bytes, CRLF included) still to come
        self.body = 0

    def feed(self, data: bytes) -> None:
        while data:
            if self.state in ("head", "size", "trailer"):
                data = self._line_state(data)
            else:
                data = self._body_state(data)

    def closed(self) -> None:
        if self.state == "close":
            self.on_end(self.body)

    def _line_state(self, data: bytes) -> bytes:
        self.buffer += data
        end_mark = b"\r\n\r\n" if self.state == "head" else b"\r\n"
        end = self.buffer.find(end_mark)
        if end < 0:
            return b""
        line, rest = self.buffer[:end], self.buffer[end + len(end_mark):]
        self.buffer = b""
        if self.state == "head":
            self._head(line)
        elif self.state == "size":
            self._chunk_size(int(line.split(b";")[0], 16))
        elif not line:  # the empty line that ends the trailer
            self._end()
        return rest

    def _head(self, head: bytes) -> None:
        framing = self.on_head(head)
        self.body = 0
        if framing is None:
            return
        if framing == CHUNKED:
            self.state = "size"
        elif framing == TO_CLOSE:
            self.state = "close"
        elif framing == 0:
            self._end()
        else:
            self.state, self.remaining = "length", framing

    def _chunk_size(self, size: int) -> None:
        if size == 0:
            self.state = "trailer"
        else:
            self.body += size
            self.state, self.remaining = "chunk", size + 2  # the data, then its CRLF

    def _body_state(self, data: bytes) -> bytes:
        if self.state == "close":
            self.body += len(data)
            return b""
        take = min(self.remaining, len(data))
        self.remaining -= take
        if self.state == "length":
            self.body += take
        if self.remaining == 0:
            if self.state == "length":
                self._end()
            else:
                self.state = "size"
        return data[take:]

    def _end(self) -> None:
        self.state = "head"
        self.on_end(self.body)
