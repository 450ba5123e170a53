"""GGUF metadata read from the first bytes of a file (`llamafleet.gguf_info`), checked against
files written by the `gguf` package and against gguf's own reader. No server needed."""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llamafleet.gguf_info import HeaderSniffer, NotGGUF, Truncated, parse_header
from llamafleet.gguf_magic import MAGIC, magic_problem

KB = 1 << 10


def write_gguf(
    path: Path,
    *,
    arch: str = "qwen2",
    vocab: int = 100,
    file_type: gguf.LlamaFileType | None = gguf.LlamaFileType.MOSTLY_Q4_K_M,
    endianess: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE,
) -> Path:
    """A small GGUF with a vocabulary of `vocab` tokens and merges (which makes the header
    as large as wanted) and three tensors of 4096 + 8 + 96 elements."""
    writer = gguf.GGUFWriter(path, arch, endianess=endianess)
    writer.add_name("test model\x07 [bold]")
    writer.add_size_label("4K")
    writer.add_context_length(32768)
    writer.add_embedding_length(64)
    writer.add_block_count(2)
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_token_list([f"token-{i}" for i in range(vocab)])
    writer.add_token_types([1] * vocab)
    writer.add_token_scores([0.5] * vocab)
    writer.add_token_merges([f"a{i} b{i}" for i in range(vocab)])
    writer.add_array("test.nested", [[1, 2], [3]])
    writer.add_tensor("token_embd.weight", np.zeros((64, 64), dtype=np.float32))
    writer.add_tensor("norm.weight", np.zeros(8, dtype=np.float32))
    writer.add_tensor("x.weight", np.zeros((2, 3, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def stream(data: bytes, chunk: int) -> list[bytes]:
    return [data[i : i + chunk] for i in range(0, len(data), chunk)]


def sniff(data: bytes, chunk: int = 64 * KB, **kwargs: int) -> HeaderSniffer:
    sniffer = HeaderSniffer(**kwargs)
    for piece in stream(data, chunk):
        if sniffer.feed(piece):
            sniffer.parse()
    sniffer.parse(final=True)
    return sniffer


def test_demo_model_metadata_matches_ggufs_own_reader(demo_model: Path) -> None:
    data = demo_model.read_bytes()
    reader = gguf.GGUFReader(demo_model)
    metadata = parse_header(data).metadata()
    assert metadata["architecture"] == "llama"
    assert metadata["name"] == "llamafleet-demo"
    assert metadata["quantization"] == "F16"
    assert metadata["context_length"] == "4096"
    assert metadata["parameter_count"] == str(sum(int(t.n_elements) for t in reader.tensors))
    assert metadata["tensor_count"] == str(len(reader.tensors))
    assert metadata["vocab_size"] == str(len(reader.fields["tokenizer.ggml.tokens"].data))
    assert metadata["gguf_version"] == "3"
    # The same from a stream, in chunks smaller than the header.
    assert sniff(data, chunk=1000, first_try=4 * KB).metadata() == metadata


def test_large_header_is_read_from_a_growing_prefix(tmp_path: Path) -> None:
    data = write_gguf(tmp_path / "big.gguf", vocab=40_000).read_bytes()
    assert len(data) > 1 << 20  # larger than the first parse attempt
    sniffer = sniff(data, first_try=64 * KB)
    assert sniffer.done
    metadata = sniffer.metadata()
    assert metadata == {
        "architecture": "qwen2",
        # Control characters dropped (values end up in terminals).
        "name": "test model [bold]",
        "size_label": "4K",
        "parameter_count": str(64 * 64 + 8 + 2 * 3 * 16),
        "quantization": "Q4_K_M",
        "tensor_count": "3",
        "gguf_version": "3",
        "vocab_size": "40000",
        "context_length": "32768",
        "embedding_length": "64",
        "block_count": "2",
    }


def test_big_endian_files(tmp_path: Path) -> None:
    data = write_gguf(tmp_path / "be.gguf", endianess=gguf.GGUFEndian.BIG).read_bytes()
    header = parse_header(data)
    assert header.big_endian
    assert header.metadata()["parameter_count"] == str(64 * 64 + 8 + 96)
    assert header.metadata()["context_length"] == "32768"


def test_quantization_falls_back_to_the_dominant_tensor_type(tmp_path: Path) -> None:
    data = write_gguf(tmp_path / "nft.gguf", file_type=None).read_bytes()
    assert parse_header(data).metadata()["quantization"] == "F32"


def test_what_does_not_fit_under_the_limit_is_left_out(tmp_path: Path) -> None:
    data = write_gguf(tmp_path / "big.gguf", vocab=20_000).read_bytes()
    # The tensor infos start with the first tensor's name (after its 8-byte length).
    infos_start = data.index(b"token_embd.weight") - 8
    partial = sniff(data, limit=infos_start + 10, first_try=16 * KB)
    assert partial.done
    metadata = partial.metadata()
    assert "parameter_count" not in metadata
    assert (metadata["architecture"], metadata["vocab_size"], metadata["quantization"]) == ("qwen2", "20000", "Q4_K_M")
    # One byte short of the key/value section's end: nothing at all.
    assert sniff(data, limit=infos_start - 1, first_try=16 * KB).metadata() == {}


def test_not_gguf_stops_after_the_magic() -> None:
    sniffer = HeaderSniffer()
    assert not sniffer.feed(b"PK\x03\x04" + bytes(10_000))
    assert sniffer.done and sniffer.metadata() == {}
    with pytest.raises(NotGGUF):
        parse_header(b"GGML" + bytes(100))
    with pytest.raises(NotGGUF, match="version 1"):
        parse_header(b"GGUF" + struct.pack("<IQQ", 1, 0, 0))
    with pytest.raises(NotGGUF, match="implausible"):
        parse_header(b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 1))
    with pytest.raises(Truncated):
        parse_header(b"GGUF" + struct.pack("<I", 3))
    # A string length far past the end is Truncated, not a huge allocation.
    with pytest.raises(Truncated):
        parse_header(b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 1 << 62))
    # A tiny file that is only a header (no tensors) is complete.
    empty = parse_header(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    assert empty.parameter_count == 0 and empty.metadata()["tensor_count"] == "0"


def test_the_magic_is_ggufs_own_and_needs_no_import_of_it() -> None:
    assert struct.pack("<I", gguf.GGUF_MAGIC) == MAGIC
    assert magic_problem(b"GGUF\x03") is None and magic_problem(b"GG") is None
    assert "not the GGUF magic" in (magic_problem(b"PK\x03\x04") or "")


def test_the_sniffer_says_why_a_stream_is_not_gguf(demo_model: Path) -> None:
    assert "not the GGUF magic" in (sniff(b"PK\x03\x04" + bytes(100)).problem or "")
    assert "version 1" in (sniff(b"GGUF" + struct.pack("<IQQ", 1, 0, 0) + bytes(100)).problem or "")
    assert "ends within its header" in (sniff(b"GGUF" + struct.pack("<I", 3)).problem or "")
    assert "ends within its header" in (sniff(b"").problem or "")
    assert sniff(demo_model.read_bytes()).problem is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048), st.integers(min_value=0, max_value=2))
def test_any_bytes_parse_or_fail_cleanly(tail: bytes, prefix_kind: int) -> None:
    # Valid starts followed by garbage reach deep into the parser.
    prefix = [b"GGUF", b"GGUF" + struct.pack("<IQQ", 3, 2, 3), b""][prefix_kind]
    data = prefix + tail
    with contextlib.suppress(NotGGUF, Truncated):
        parse_header(data)
    sniffer = HeaderSniffer(limit=1024, first_try=16)
    for piece in stream(data, 100):
        if sniffer.feed(piece):
            sniffer.parse()
    sniffer.parse(final=True)
    assert sniffer.done
    assert all(isinstance(v, str) and v.isprintable() for v in sniffer.metadata().values())
