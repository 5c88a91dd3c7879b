"""A small TCP proxy in front of the test S3 server that injects faults into the next connections.

`arm(kind, count)` makes the next `count` new connections fail, then connections are forwarded
untouched again. Arming also cuts every open connection, so the client's pooled keep-alive
connections cannot carry requests past the faults. Kinds:
- "503": read the request, answer `503 SlowDown` (the S3 throttling answer), close;
- "reset": read the request, close with a TCP reset;
- "hang": read the request, never answer (the client's read timeout fires);
- "lost-reply": forward the request to the server, then reset instead of relaying its answer
  (the server did the work; the client never hears of it).
`served` counts the faults delivered, so a test can tell its faults really happened; `accepted`
counts the connections clients opened (a client that reuses its connections opens few).
"""

from __future__ import annotations

import socket
import struct
import threading

SLOW_DOWN = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>"
             b"<Message>Please reduce your request rate.</Message></Error>")
KINDS = ("503", "reset", "hang", "lost-reply")


class FaultProxy:
    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.served = 0
        self.accepted = 0
        self._faults: list[str] = []
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def arm(self, kind: str, count: int) -> None:
        assert kind in KINDS
        with self._lock:
            self._faults += [kind] * count
            stale, self._open = self._open, set()
        for sock in stale:
            _reset(sock)

    def close(self) -> None:
        self._closed.set()
        self.listener.close()
        self.arm("reset", 0)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                fault = self._faults.pop(0) if self._faults else None
                self._open.add(client)
                self.accepted += 1
            threading.Thread(target=self._serve, args=(client, fault), daemon=True).start()

    def _serve(self, client: socket.socket, fault: str | None) -> None:
        if fault in ("503", "reset", "hang"):
            _read_request(client)
            self._count()
            if fault == "503":
                client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                               b"Content-Length: %d\r\nConnection: close\r\n\r\n"
                               % len(SLOW_DOWN) + SLOW_DOWN)
                client.close()
            elif fault == "reset":
                _reset(client)
            return  # "hang": left open until the client gives up or the proxy closes
        upstream = socket.create_connection(self.target)
        with self._lock:
            self._open.add(upstream)
        threading.Thread(target=_pump, args=(client, upstream), daemon=True).start()
        if fault == "lost-reply":
            _relay_interim_answers(upstream, client)  # the server answered: it did the work
            self._count()
            _reset(client)
            upstream.close()
        else:
            _pump(upstream, client)

    def _count(self) -> None:
        with self._lock:
            self.served += 1


def _read_request(sock: socket.socket) -> None:
    """Read one request's head and its body (by Content-Length) so the client sent it whole."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        headers[key.strip().lower()] = value.strip()
    if headers.get(b"expect", b"").lower() == b"100-continue":
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")  # or the client waits a second
    length = int(headers.get(b"content-length", 0))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return
        body += chunk


def _relay_interim_answers(upstream: socket.socket, client: socket.socket) -> None:
    """Relay `100 Continue` answers (so the client sends its body) until the server starts its
    final answer."""
    data = b""
    while True:
        chunk = upstream.recv(65536)
        if not chunk:
            return
        data += chunk
        while b"\r\n\r\n" in data and data.startswith(b"HTTP/1.1 1"):
            interim, _, data = data.partition(b"\r\n\r\n")
            client.sendall(interim + b"\r\n\r\n")
        if data and not b"HTTP/1.1 1".startswith(data[:10]):
            return


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        _reset(sink)


def _reset(sock: socket.socket) -> None:
    """Close with RST, not FIN: what a crashed or overloaded server's connection looks like.
    The shutdown first wakes a pump thread blocked reading the socket, which would otherwise
    keep it open."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
