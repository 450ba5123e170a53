"""Kept-alive HTTP/1.1 connections, one per server on each thread, for the SeaweedFS clients
that move bytes on threads (the chunk reader and the storage service's chunk writer)."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Mapping, Sequence

__all__ = ["CONNECT_TIMEOUT_S", "ThreadConnections"]

# A short connect timeout (an unreachable server shows fast), then the caller's timeout per read.
CONNECT_TIMEOUT_S = 3.0
# What is read of an answer other than 200/206: enough for its message.
_ERROR_BODY_BYTES = 2000


class ThreadConnections:
    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._local = threading.local()

    def request(
        self,
        netloc: str,
        method: str,
        target: str,
        body: Sequence[memoryview] = (),
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """One request on this thread's connection to `netloc`: (status, body; at most
        2000 bytes of an answer other than 200/206). A kept-alive connection that the server
        closed meanwhile (idle) is replaced once: that is no failure."""
        while True:
            reused = netloc in self._connections()
            connection = self._connection(netloc)
            try:
                connection.request(method, target, body=list(body) if body else None, headers=dict(headers or {}))
                response = connection.getresponse()
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
                self.drop(netloc)
                if reused:
                    continue
                raise
            except BaseException:
                self.drop(netloc)
                raise
            try:
                # With a Content-Length this reads straight into one bytes object.
                data = response.read() if response.status in (200, 206) else response.read(_ERROR_BODY_BYTES)
            except BaseException:
                self.drop(netloc)
                raise
            if not response.isclosed():  # the server closes, or part of the answer is unread
                self.drop(netloc)
            return response.status, data

    def drop(self, netloc: str) -> None:
        """Close this thread's connection to `netloc`, if any."""
        if (connection := self._connections().pop(netloc, None)) is not None:
            connection.close()

    def _connections(self) -> dict[str, http.client.HTTPConnection]:
        return self._local.__dict__.setdefault("connections", {})

    def _connection(self, netloc: str) -> http.client.HTTPConnection:
        connections = self._connections()
        if (connection := connections.get(netloc)) is None:
            connection = http.client.HTTPConnection(netloc, timeout=min(CONNECT_TIMEOUT_S, self._timeout))
            connection.connect()
            assert connection.sock is not None
            connection.sock.settimeout(self._timeout)
            connections[netloc] = connection
        return connection
