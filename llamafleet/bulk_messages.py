"""Messages that carry bulk bytes (PutBlob's and GetBlob's data), encoded and decoded by hand.

protobuf copies a bytes field twice on the way out (into the message, then into its encoding)
and again on the way in; at hundreds of MiB/s those copies are most of what both ends of a
transfer spend their CPU on. A message whose one field is a bytes field has a fixed wire form
(the field's tag, its length as a varint, the bytes), so it is built here with one copy and
read with none: a memoryview into the buffer gRPC received.
"""

from __future__ import annotations

from google.protobuf.message import Message

_LENGTH_DELIMITED = 2


def encode_bytes_field(field: int, data: bytes | memoryview) -> bytes:
    """The wire encoding of a message whose only field is bytes `field` = `data`."""
    prefix = bytearray()
    key = field << 3 | _LENGTH_DELIMITED
    for n in (key, len(data)):
        while n >= 0x80:
            prefix.append(n & 0x7F | 0x80)
            n >>= 7
        prefix.append(n)
    return b"".join((prefix, data))


def decode_bytes_field(field: int, buf: bytes) -> memoryview | None:
    """The bytes of `field` if `buf` encodes a message of that one field, else None (then it
    is some other message of the oneof: parse it with protobuf)."""
    view = memoryview(buf)
    pos = 0
    values = []
    for _ in range(2):  # the key, then the length
        value = shift = 0
        while True:
            if pos >= len(view) or shift > 63:
                return None
            byte = view[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        values.append(value)
    key, length = values
    if key != field << 3 | _LENGTH_DELIMITED or pos + length != len(view):
        return None
    return view[pos:]


def serialize(message: Message | bytes) -> bytes:
    """A gRPC serializer for calls whose bulk data messages come encoded already."""
    return message if isinstance(message, bytes) else message.SerializeToString()
