"""What a GGUF model is, read from the first bytes of the file: architecture, name, parameter
count, quantization, context length.

`gguf.GGUFReader` wants the whole file (it memory-maps it); storage sees a model as a stream,
so this module parses the header itself from a bounded prefix. A GGUF file starts with

    magic "GGUF" | version u32 | tensor count u64 | key/value count u64
    key/value pairs   (key string, value type u32, value)
    tensor infos      (name string, n_dims u32, dims u64[n_dims], type u32, offset u64)
    tensor data

(strings are a u64 length and UTF-8 bytes; numbers are little-endian unless the file is
big-endian, which shows as a byte-swapped version). The key/value section holds the metadata;
the parameter count needs the tensor infos too. Both usually fit in the first few MiB, but a
large vocabulary (tokens and merges are string arrays) can take tens of MiB, so the header is
read from a growing prefix, up to a limit, and what did not fit is left out.

Pure: bytes in, values out; nothing here does I/O.
"""

from __future__ import annotations

import math
import struct
from collections import Counter
from dataclasses import dataclass, field

from gguf.constants import GGMLQuantizationType, GGUFValueType, Keys, LlamaFileType, PoolingType

from llamafleet.gguf_magic import MAGIC, magic_problem

# GGUF v1 used 32-bit counts and lengths; every current writer produces v2 or v3.
SUPPORTED_VERSIONS = (2, 3)
# How much of a stream is read at most to find the header.
DEFAULT_LIMIT = 64 << 20
# Bounds on counts that no real model comes near, so a hostile header cannot make the
# parser loop for long over a small buffer.
MAX_KV = 1 << 16
MAX_TENSORS = 1 << 20
MAX_DIMS = 8
MAX_ARRAY_DEPTH = 4
# Metadata values are shown in terminals and tables: keep them short and printable.
MAX_VALUE_CHARS = 256

_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}

Scalar = int | float | bool | str


class NotGGUF(ValueError):
    """The bytes are not a GGUF header this module can read (wrong magic, unsupported
    version, implausible counts, unknown value types)."""


class Truncated(ValueError):
    """The key/value section does not end within the bytes given."""


@dataclass(frozen=True)
class GGUFHeader:
    """The parsed header. `fields` holds the scalar values by key and, for arrays, their
    length; `parameter_count` and `tensor_types` are None/empty when the tensor infos did
    not all fit in the bytes given."""

    version: int
    big_endian: bool
    tensor_count: int
    fields: dict[str, Scalar]
    parameter_count: int | None = None
    # Elements per GGML type, over all tensors.
    tensor_types: dict[int, int] = field(default_factory=dict)

    def metadata(self) -> dict[str, str]:
        """The manifest's view of the model: short printable strings, only what is known."""
        fields = self.fields
        arch = fields.get(Keys.General.ARCHITECTURE)
        found: dict[str, object] = {
            "architecture": arch,
            "name": fields.get(Keys.General.NAME),
            "size_label": fields.get(Keys.General.SIZE_LABEL),
            "parameter_count": self.parameter_count,
            "quantization": self.quantization(),
            "tensor_count": self.tensor_count,
            "gguf_version": self.version,
            # A tokens array is stored as its length (see _Parser.value).
            "vocab_size": fields.get(Keys.Tokenizer.LIST),
        }
        if isinstance(arch, str):
            found["context_length"] = fields.get(Keys.LLM.CONTEXT_LENGTH.format(arch=arch))
            found["embedding_length"] = fields.get(Keys.LLM.EMBEDDING_LENGTH.format(arch=arch))
            found["block_count"] = fields.get(Keys.LLM.BLOCK_COUNT.format(arch=arch))
            found["pooling_type"] = _pooling_name(fields.get(Keys.LLM.POOLING_TYPE.format(arch=arch)))
        return {key: _printable(value) for key, value in found.items() if value is not None and value != ""}

    def quantization(self) -> str | None:
        """The file type the converter declared (e.g. "Q4_K_M"), else the tensor type that
        holds the most elements (e.g. "F16"), else None."""
        file_type = self.fields.get(Keys.General.FILE_TYPE)
        if isinstance(file_type, int) and not isinstance(file_type, bool):
            try:
                return LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
            except ValueError:
                return f"file_type_{file_type}"
        if self.tensor_types:
            dominant = max(self.tensor_types.items(), key=lambda item: item[1])[0]
            try:
                return GGMLQuantizationType(dominant).name
            except ValueError:
                return f"ggml_type_{dominant}"
        return None


def _pooling_name(value: Scalar | None) -> str | None:
    """ "mean", "cls", "last", "none" or "rank" for a `{arch}.pooling_type` value."""
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    try:
        return PoolingType(value).name.lower()
    except ValueError:
        return f"pooling_type_{value}"


def _printable(value: object) -> str:
    text = "".join(c for c in str(value) if c.isprintable())
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."


class _Parser:
    """A cursor over `data`; every read raises Truncated past the end."""

    def __init__(self, data: bytes | bytearray | memoryview, big_endian: bool) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.order = ">" if big_endian else "<"

    def _need(self, n: int) -> None:
        if self.pos + n > len(self.data):
            raise Truncated(f"needs {self.pos + n} bytes, have {len(self.data)}")

    def unpack(self, fmt: str) -> Scalar:
        size = struct.calcsize(fmt)
        self._need(size)
        (value,) = struct.unpack_from(self.order + fmt, self.data, self.pos)
        self.pos += size
        return value

    def u32(self) -> int:
        return int(self.unpack("I"))

    def u64(self) -> int:
        return int(self.unpack("Q"))

    def string(self) -> str:
        n = self.u64()
        self._need(n)
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        return bytes(raw).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.u64()
        self._need(n)
        self.pos += n

    def value_type(self) -> GGUFValueType:
        raw = self.u32()
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise NotGGUF(f"unknown value type {raw} at byte {self.pos - 4}") from None

    def value(self, kind: GGUFValueType, depth: int = 0) -> Scalar:
        """A scalar's value; an array is skipped and stands for its length."""
        if kind is GGUFValueType.STRING:
            return self.string()
        if kind is GGUFValueType.ARRAY:
            return self.skip_array(depth)
        return self.unpack(_SCALARS[kind])

    def skip_array(self, depth: int) -> int:
        if depth >= MAX_ARRAY_DEPTH:
            raise NotGGUF(f"arrays nested deeper than {MAX_ARRAY_DEPTH}")
        kind = self.value_type()
        count = self.u64()
        if kind in _SCALARS:
            # Fixed-size elements: one bounds check, no loop.
            size = struct.calcsize(_SCALARS[kind]) * count
            self._need(size)
            self.pos += size
        elif kind is GGUFValueType.STRING:
            for _ in range(count):
                self.skip_string()
        else:
            for _ in range(count):
                self.skip_array(depth + 1)
        return count


def parse_header(data: bytes | bytearray | memoryview) -> GGUFHeader:
    """Parse the GGUF header at the start of `data` (a prefix of the file).

    NotGGUF if it is not one; Truncated if the key/value section does not end within `data`.
    If the key/value section fits but the tensor infos do not, the header comes back without
    a parameter count."""
    if len(data) < 4:
        raise Truncated("fewer than 4 bytes")
    if bytes(data[:4]) != MAGIC:
        raise NotGGUF("no GGUF magic")
    if len(data) < 24:
        raise Truncated("the fixed header is 24 bytes")
    (version,) = struct.unpack_from("<I", data, 4)
    # A big-endian file's version reads byte-swapped (e.g. 0x03000000) as little-endian.
    big_endian = version & 0xFFFF == 0
    parser = _Parser(data, big_endian)
    parser.pos = 4
    version = parser.u32()
    if version not in SUPPORTED_VERSIONS:
        raise NotGGUF(f"GGUF version {version} is not supported (only {SUPPORTED_VERSIONS})")
    tensor_count = parser.u64()
    kv_count = parser.u64()
    if kv_count > MAX_KV or tensor_count > MAX_TENSORS:
        raise NotGGUF(f"implausible counts: {kv_count} keys, {tensor_count} tensors")

    fields: dict[str, Scalar] = {}
    for _ in range(kv_count):
        key = parser.string()
        fields[key] = parser.value(parser.value_type())

    header = GGUFHeader(version, big_endian, tensor_count, fields)
    try:
        parameters, types = _tensor_infos(parser, tensor_count)
    except Truncated:
        return header
    return GGUFHeader(version, big_endian, tensor_count, fields, parameters, types)


def _tensor_infos(parser: _Parser, count: int) -> tuple[int, dict[int, int]]:
    total = 0
    types: Counter[int] = Counter()
    for _ in range(count):
        parser.skip_string()
        n_dims = parser.u32()
        if n_dims > MAX_DIMS:
            raise NotGGUF(f"a tensor with {n_dims} dimensions")
        elements = math.prod(parser.u64() for _ in range(n_dims))
        ggml_type = parser.u32()
        parser.u64()  # data offset
        total += elements
        types[ggml_type] += elements
    return total, dict(types)


class HeaderSniffer:
    """Reads GGUF metadata from a stream while it passes by: `feed` every chunk, call
    `parse` (possibly in a thread: it can take a fraction of a second on a large vocabulary)
    whenever `feed` returns True and once more with `final=True` at the end, then read
    `metadata()`.

    Only the first `limit` bytes are kept, and nothing after the first 4 if they are not
    the GGUF magic. Parse attempts happen at doubling prefix sizes from `first_try`, so the
    total parsing work stays within twice that of the final prefix."""

    def __init__(self, limit: int = DEFAULT_LIMIT, first_try: int = 1 << 20) -> None:
        self.limit = limit
        self._buffer = bytearray()
        self._next_try = min(first_try, limit)
        self._header: GGUFHeader | None = None
        self.done = False
        # Why the stream is not a GGUF file, once that is known (None: it may be one).
        self.problem: str | None = None

    def feed(self, chunk: bytes) -> bool:
        """Take the next bytes of the stream; True when `parse()` is due."""
        if self.done:
            return False
        room = self.limit - len(self._buffer)
        self._buffer += chunk[:room]
        if (problem := magic_problem(self._buffer)) is not None:
            self.problem = problem
            self._finish()
            return False
        return len(self._buffer) >= self._next_try

    def parse(self, final: bool = False) -> None:
        """Try to read the header from what was fed. `final`: the stream ended, so keep
        whatever could be read."""
        if self.done:
            return
        last_chance = final or len(self._buffer) >= self.limit
        try:
            header = parse_header(self._buffer)
        except NotGGUF as e:
            self.problem = str(e)
            self._finish()
            return
        except Truncated as e:
            header = None
            if final and self._header is None and len(self._buffer) < self.limit:
                self.problem = f"it ends within its header after {len(self._buffer)} bytes ({e})"
        if header is not None:
            self._header = header
        complete = header is not None and header.parameter_count is not None
        if complete or last_chance:
            self._finish()
        else:
            self._next_try = min(self.limit, max(self._next_try, len(self._buffer)) * 2)

    def _finish(self) -> None:
        self.done = True
        self._buffer = bytearray()

    @property
    def header(self) -> GGUFHeader | None:
        """The header read so far (None: not GGUF, or not readable from the prefix)."""
        return self._header

    def metadata(self) -> dict[str, str]:
        """`GGUFHeader.metadata()` of what was read; empty when nothing was."""
        return self._header.metadata() if self._header is not None else {}
