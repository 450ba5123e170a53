"""ChunkReader against a small local HTTP server standing in for a volume server (no SeaweedFS):
pieces in order, and kept-alive connections that the server closed meanwhile."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llamafleet.chunk_reader import Chunk, ChunkReader, plan_pieces

KB = 1 << 10
DATA = os.urandom(300 * KB + 7)


class _Volume(BaseHTTPRequestHandler):
    """Serves DATA as needle "1,ab" with ranges; says nothing of closing, then closes the
    connection after every answer (as a server does with connections it found idle)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        first, last = (int(x) for x in self.headers["Range"].removeprefix("bytes=").split("-"))
        body = DATA[first : last + 1]
        self.send_response(206)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def volume() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Volume)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_pieces_stay_within_chunks_and_cover_the_range() -> None:
    chunks = [Chunk("1,a", 0, 10), Chunk("1,b", 10, 25)]
    pieces = list(plan_pieces(chunks, 3, 30, 8))
    assert [(p.offset, p.length, p.chunk.file_id if p.chunk else None, p.chunk_start) for p in pieces] == [
        (3, 7, "1,a", 3),
        (10, 8, "1,b", 0),
        (18, 8, "1,b", 8),
        (26, 7, "1,b", 16),
    ]
    assert [(p.offset, p.length) for p in plan_pieces(None, 5, 20, 8)] == [(5, 8), (13, 8), (21, 4)]


@pytest.mark.asyncio
async def test_a_connection_the_volume_server_closed_is_replaced_not_avoided(volume: str) -> None:
    reader = ChunkReader(None, piece_bytes=64 * KB, parallel=1)
    try:
        reader.remember("1", [volume])
        chunks = [Chunk("1,ab", 0, len(DATA))]
        for _ in range(2):
            assert b"".join([c async for c in reader.read("", chunks, 0, len(DATA))]) == DATA
        assert reader.bytes_from_volumes == 2 * len(DATA)
    finally:
        reader.close()
