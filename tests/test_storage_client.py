"""The storage client's pure parts: files read in reused chunks, name:tag references."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from llamafleet.names import split_name_tag
from llamafleet.storage_client import MESSAGE_BYTES, read_chunks, sha256_file


@pytest.mark.parametrize("size", [0, 5, MESSAGE_BYTES, 2 * MESSAGE_BYTES + 3])
def test_files_are_read_whole_in_chunks(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert b"".join(bytes(chunk) for chunk in read_chunks(path)) == data
    seen: list[int] = []
    assert sha256_file(path, seen.append) == hashlib.sha256(data).hexdigest()
    assert sum(seen) == size


def test_name_tag_references() -> None:
    assert split_name_tag("team/llama:q4") == ("team/llama", "q4")
    assert split_name_tag("llama") == ("llama", "latest")
    # A ':' in a host:port part of a name is not a tag separator.
    assert split_name_tag("host:5000/llama") == ("host:5000/llama", "latest")
