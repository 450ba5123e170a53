"""Bulk data messages encoded and decoded by hand: the same bytes as protobuf's, both ways."""

from __future__ import annotations

import os

import pytest

from llamafleet.bulk_messages import decode_bytes_field, encode_bytes_field, serialize
from llamafleet.v1 import storage_pb2

SIZES = [0, 1, 127, 128, 16_383, 16_384, 1 << 20, (4 << 20) + 7]


@pytest.mark.parametrize("size", SIZES)
def test_encoding_is_what_protobuf_encodes(size: int) -> None:
    data = os.urandom(size)
    expected = storage_pb2.PutBlobRequest(data=data).SerializeToString()
    assert encode_bytes_field(2, data) == expected
    assert encode_bytes_field(2, memoryview(data)) == expected
    assert storage_pb2.PutBlobRequest.FromString(encode_bytes_field(2, data)).data == data


@pytest.mark.parametrize("size", SIZES)
def test_decoding_reads_what_protobuf_encodes(size: int) -> None:
    data = os.urandom(size)
    decoded = decode_bytes_field(2, storage_pb2.GetBlobResponse(data=data).SerializeToString())
    assert isinstance(decoded, memoryview)
    assert decoded == data


def test_other_messages_are_left_to_protobuf() -> None:
    info = storage_pb2.GetBlobResponse(info=storage_pb2.BlobInfo(sha256="ab" * 32, size_bytes=5))
    encoded = info.SerializeToString()
    assert decode_bytes_field(2, encoded) is None
    # Another field, a short or overlong buffer, a truncated varint: not this one field.
    assert decode_bytes_field(1, encode_bytes_field(2, b"abc")) is None
    assert decode_bytes_field(2, encode_bytes_field(2, b"abc")[:-1]) is None
    assert decode_bytes_field(2, encode_bytes_field(2, b"abc") + b"\x00") is None
    assert decode_bytes_field(2, b"\x12\x80") is None
    assert decode_bytes_field(2, b"") is None


def test_serialize_passes_encoded_messages_through() -> None:
    encoded = encode_bytes_field(2, b"abc")
    assert serialize(encoded) is encoded
    info = storage_pb2.GetBlobResponse(info=storage_pb2.BlobInfo(size_bytes=5))
    assert serialize(info) == info.SerializeToString()
