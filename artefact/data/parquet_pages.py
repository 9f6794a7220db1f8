"""One binary column chunk of a Parquet file, read page by page.

Arrow reads a column chunk with about four copies of its largest value alive at once (the
compressed page, the decompressed page, the dictionary array and the decoded array): 1.5 GB
for one 378 MB encoded image. Reading the pages here holds at most two (the compressed page
while it is decompressed) and hands each value on as a zero-copy slice of its page.

Only the layouts a flat optional BYTE_ARRAY column can have are read: data pages v1 and v2,
PLAIN values with or without a dictionary, and any codec Arrow has except Hadoop's LZ4
framing. Anything else raises ``UnsupportedLayout``, and the caller reads the chunk with
Arrow instead.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DATA_PAGE, INDEX_PAGE, DICTIONARY_PAGE, DATA_PAGE_V2 = 0, 1, 2, 3
PLAIN, PLAIN_DICTIONARY, RLE, RLE_DICTIONARY = 0, 2, 3, 8
CODECS = {
    "UNCOMPRESSED": None,
    "SNAPPY": "snappy",
    "GZIP": "gzip",
    "BROTLI": "brotli",
    "ZSTD": "zstd",
    "LZ4_RAW": "lz4_raw",
}
MAX_PAGE_BYTES = 1 << 32
"""Parquet page sizes are 32-bit: a larger one is a damaged header, not an allocation to try."""
# Thrift compact protocol type codes (https://github.com/apache/thrift, compact protocol spec)
_TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(1, 13)


class UnsupportedLayout(Exception):
    """The chunk uses a page type, encoding, codec or nesting this reader does not handle."""


UNREADABLE = (UnsupportedLayout, EOFError, KeyError, IndexError, ValueError, struct.error, pa.ArrowException)
"""What reading a chunk here can raise: the caller then reads it with Arrow, which reads any
layout and names what is wrong with a damaged file."""


class _Thrift:
    """A Thrift compact-protocol reader over a file, for Parquet page headers: a struct is
    returned as ``{field id: value}``, nested structs as dicts and lists as lists."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream

    def _byte(self) -> int:
        data = self.stream.read(1)
        if not data:
            raise EOFError("the file ends inside a page header")
        return data[0]

    def varint(self) -> int:
        shift = result = 0
        while True:
            byte = self._byte()
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7

    def zigzag(self) -> int:
        value = self.varint()
        return (value >> 1) ^ -(value & 1)

    def value(self, kind: int):
        if kind in (_TRUE, _FALSE):
            return self._byte() == _TRUE  # inside a list; a struct field's bool is in its header
        if kind == _BYTE:
            return self._byte()
        if kind in (_I16, _I32, _I64):
            return self.zigzag()
        if kind == _DOUBLE:
            return struct.unpack("<d", self.stream.read(8))[0]
        if kind == _BINARY:
            return self.stream.read(self.varint())
        if kind in (_LIST, _SET):
            header = self._byte()
            size = header >> 4 if header >> 4 != 15 else self.varint()
            return [self.value(header & 0x0F) for _ in range(size)]
        if kind == _MAP:
            size = self.varint()
            kinds = self._byte() if size else 0
            return {self.value(kinds >> 4): self.value(kinds & 0x0F) for _ in range(size)}
        if kind == _STRUCT:
            return self.struct()
        raise UnsupportedLayout(f"Thrift type {kind} in a page header")

    def struct(self) -> dict[int, object]:
        fields: dict[int, object] = {}
        field_id = 0
        while True:
            header = self._byte()
            if header == 0:
                return fields
            kind, delta = header & 0x0F, header >> 4
            field_id = field_id + delta if delta else self.zigzag()
            fields[field_id] = kind == _TRUE if kind in (_TRUE, _FALSE) else self.value(kind)


def _hybrid(data: memoryview, bit_width: int, count: int) -> np.ndarray:
    """``count`` values of Parquet's RLE / bit-packed hybrid encoding."""
    out = np.empty(count, np.int64)
    stream = _Thrift(pa.BufferReader(pa.py_buffer(data)))
    filled = 0
    value_bytes = (bit_width + 7) // 8
    while filled < count:
        header = stream.varint()
        if header & 1:  # bit-packed: (header >> 1) groups of 8 values, LSB first
            groups = header >> 1
            packed = np.frombuffer(stream.stream.read(groups * bit_width), np.uint8)
            bits = np.unpackbits(packed, bitorder="little").reshape(-1, bit_width) if bit_width else None
            values = (
                bits.astype(np.int64) @ (1 << np.arange(bit_width, dtype=np.int64))
                if bits is not None
                else np.zeros(groups * 8, np.int64)
            )
            take = min(len(values), count - filled)
        else:  # run-length: (header >> 1) copies of one value
            take = min(header >> 1, count - filled)
            values = np.full(take, int.from_bytes(stream.stream.read(value_bytes), "little"), np.int64)
        out[filled : filled + take] = values[:take]
        filled += take
    return out


def _plain_values(page: pa.Buffer, start: int, count: int) -> list[pa.Buffer]:
    """``count`` PLAIN BYTE_ARRAY values (4-byte length, then the bytes) as slices of ``page``."""
    view = memoryview(page)
    values = []
    for _ in range(count):
        (length,) = struct.unpack_from("<I", view, start)
        values.append(page.slice(start + 4, length))
        start += 4 + length
    return values


def _read_page(stream: BinaryIO, size: int) -> pa.Buffer:
    buffer = pa.allocate_buffer(size)
    if stream.readinto(memoryview(buffer).cast("B")) != size:
        raise EOFError("the file ends inside a page")
    return buffer


def read_binary_column(path: Path, metadata: pq.FileMetaData, row_group: int, column: int) -> list[pa.Buffer | None]:
    """Every row's value of one BYTE_ARRAY leaf column in one row group (None where null).

    Raises one of ``UNREADABLE`` where the chunk is laid out otherwise or is damaged.
    """
    leaf = metadata.schema.column(column)
    chunk = metadata.row_group(row_group).column(column)
    rows = metadata.row_group(row_group).num_rows
    if leaf.physical_type != "BYTE_ARRAY" or leaf.max_repetition_level != 0:
        raise UnsupportedLayout(f"{leaf.path}: {leaf.physical_type}, repetition level {leaf.max_repetition_level}")
    if chunk.compression not in CODECS:
        raise UnsupportedLayout(f"{leaf.path}: codec {chunk.compression}")
    codec = pa.Codec(CODECS[chunk.compression]) if CODECS[chunk.compression] else None
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    values: list[pa.Buffer | None] = []
    dictionary: list[pa.Buffer] = []
    with open(path, "rb") as stream:
        stream.seek(start)
        for kind, header, levels, body in _pages(stream, start + chunk.total_compressed_size, codec):
            if kind == DICTIONARY_PAGE:
                if header.get(2, PLAIN) not in (PLAIN, PLAIN_DICTIONARY):
                    raise UnsupportedLayout(f"{leaf.path}: dictionary encoding {header.get(2)}")
                dictionary = _plain_values(body, 0, header[1])
            else:
                values.extend(_page_values(kind, header, levels, body, dictionary, leaf.max_definition_level))
    if len(values) != rows:
        raise UnsupportedLayout(f"{leaf.path}: its pages hold {len(values)} values for {rows} rows")
    return values


def _pages(stream: BinaryIO, end: int, codec: pa.Codec | None) -> Iterator[tuple[int, dict, bytes, pa.Buffer]]:
    """(page type, type-specific header, a v2 page's level bytes, the decompressed body)."""
    thrift = _Thrift(stream)
    while stream.tell() < end:
        header = thrift.struct()
        kind, uncompressed, compressed = header[1], header[2], header[3]
        if not 0 <= compressed <= end - stream.tell() or not 0 <= uncompressed < MAX_PAGE_BYTES:
            raise UnsupportedLayout(f"a page of {compressed} bytes ({uncompressed} decompressed) at {stream.tell()}")
        if kind == INDEX_PAGE:
            stream.seek(compressed, 1)
            continue
        if kind not in (DATA_PAGE, DICTIONARY_PAGE, DATA_PAGE_V2):
            raise UnsupportedLayout(f"page type {kind}")
        body = _read_page(stream, compressed)
        levels = b""
        if kind == DATA_PAGE_V2:  # levels are never compressed, and the values may not be
            v2 = header[8]
            levels = body.slice(0, v2[5] + v2[6]).to_pybytes()
            body = body.slice(len(levels))
            if codec is not None and v2.get(7, True):
                body = codec.decompress(body, uncompressed - len(levels))
        elif codec is not None:
            body = codec.decompress(body, uncompressed)
        yield kind, header[{DATA_PAGE: 5, DICTIONARY_PAGE: 7, DATA_PAGE_V2: 8}[kind]], levels, body


def _page_values(
    kind: int, header: dict, levels: bytes, body: pa.Buffer, dictionary: list[pa.Buffer], max_level: int
) -> list[pa.Buffer | None]:
    """A data page's values in row order, None where a row's definition level says null."""
    rows = header[1]
    position = 0
    if not max_level:
        defined = np.full(rows, True)
    elif kind == DATA_PAGE_V2:
        defined = _hybrid(memoryview(levels)[header[6] :], max_level.bit_length(), rows) == max_level
    elif header.get(3) == RLE:
        (length,) = struct.unpack_from("<I", body, 0)
        defined = _hybrid(memoryview(body)[4 : 4 + length], max_level.bit_length(), rows) == max_level
        position = 4 + length
    else:
        raise UnsupportedLayout(f"definition level encoding {header.get(3)}")
    count = int(defined.sum())
    encoding = header[4] if kind == DATA_PAGE_V2 else header[2]
    if encoding == PLAIN:
        found = _plain_values(body, position, count)
    elif encoding in (PLAIN_DICTIONARY, RLE_DICTIONARY):
        width = memoryview(body)[position]
        found = [dictionary[i] for i in _hybrid(memoryview(body)[position + 1 :], width, count)]
    else:
        raise UnsupportedLayout(f"value encoding {encoding}")
    values = iter(found)
    return [next(values) if here else None for here in defined]
