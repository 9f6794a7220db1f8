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

import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass
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
MAX_HEADER_DEPTH = 8
"""Page headers nest three structs deep (header, data page header, statistics); a deeper
header is damaged, and reading it would end in a RecursionError."""
MAX_HEADER_ITEMS = 1 << 16
"""Page headers hold short statistics and no long lists: beyond this, the header is damaged."""
# Thrift compact protocol type codes (https://github.com/apache/thrift, compact protocol spec)
_TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(1, 13)


class UnsupportedLayout(Exception):
    """The chunk uses a page type, encoding, codec or nesting this reader does not handle."""


UNREADABLE = (UnsupportedLayout, EOFError, OSError, KeyError, IndexError, ValueError, struct.error, pa.ArrowException)
"""What reading a chunk here can raise: the caller then reads it with Arrow, which reads any
layout and names what is wrong with a damaged file."""


class _Thrift:
    """A Thrift compact-protocol reader over a file, for Parquet page headers: a struct is
    returned as ``{field id: value}``, nested structs as dicts, lists as lists and maps as
    lists of pairs."""

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

    def length(self, limit: int = MAX_HEADER_ITEMS) -> int:
        value = self.varint()
        if value > limit:
            raise UnsupportedLayout(f"a page header field of {value} items: the header is damaged")
        return value

    def zigzag(self) -> int:
        value = self.varint()
        return (value >> 1) ^ -(value & 1)

    def value(self, kind: int, depth: int):
        if depth > MAX_HEADER_DEPTH:
            raise UnsupportedLayout("page header values nested too deep: the header is damaged")
        if kind in (_TRUE, _FALSE):
            return self._byte() == _TRUE  # inside a list; a struct field's bool is in its header
        if kind == _BYTE:
            return self._byte()
        if kind in (_I16, _I32, _I64):
            return self.zigzag()
        if kind == _DOUBLE:
            return struct.unpack("<d", self.stream.read(8))[0]
        if kind == _BINARY:
            return self.stream.read(self.length())
        if kind in (_LIST, _SET):
            header = self._byte()
            size = header >> 4 if header >> 4 != 15 else self.length()
            return [self.value(header & 0x0F, depth + 1) for _ in range(size)]
        if kind == _MAP:
            size = self.length()
            kinds = self._byte() if size else 0
            return [(self.value(kinds >> 4, depth + 1), self.value(kinds & 0x0F, depth + 1)) for _ in range(size)]
        if kind == _STRUCT:
            return self.struct(depth + 1)
        raise UnsupportedLayout(f"Thrift type {kind} in a page header")

    def struct(self, depth: int = 0) -> dict[int, object]:
        fields: dict[int, object] = {}
        field_id = 0
        while True:
            header = self._byte()
            if header == 0:
                return fields
            kind, delta = header & 0x0F, header >> 4
            field_id = field_id + delta if delta else self.zigzag()
            fields[field_id] = kind == _TRUE if kind in (_TRUE, _FALSE) else self.value(kind, depth)


def _hybrid(data: memoryview, bit_width: int, count: int) -> np.ndarray:
    """``count`` values of Parquet's RLE / bit-packed hybrid encoding."""
    if not 0 <= bit_width <= 32:
        raise UnsupportedLayout(f"levels or indices of {bit_width} bits")
    out = np.empty(count, np.int64)
    stream = _Thrift(io.BytesIO(data))  # levels or indices: a small copy
    filled = 0
    value_bytes = (bit_width + 7) // 8
    while filled < count:
        header = stream.varint()
        if header & 1:  # bit-packed: (header >> 1) groups of 8 values, LSB first; read those needed
            groups = min(header >> 1, -(-(count - filled) // 8))
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


@dataclass
class Page:
    """A data or dictionary page, its header checked: every field this reader uses is an
    integer in range, so a damaged header fails here rather than as a type error later."""

    kind: int
    values: int
    """Values in the page, nulls included (for a dictionary page, its entries)."""
    encoding: int
    levels: bytes
    """A v2 page's repetition and definition levels; a v1 page keeps them in ``body``."""
    level_offset: int
    """Where the definition levels start in ``levels`` (v2)."""
    level_encoding: int
    body: pa.Buffer
    """The page's bytes after its levels (v2) or all of them (v1), decompressed."""


def _ints(fields: object, *ids: int) -> list[int]:
    if not isinstance(fields, dict) or not all(type(fields.get(i)) is int and fields[i] >= 0 for i in ids):
        raise UnsupportedLayout(f"a damaged page header: {fields!r:.200}")
    return [fields[i] for i in ids]


def leaf_index(metadata: pq.FileMetaData, path: str) -> int:
    """The column number of a leaf such as ``image.bytes``, as ``read_binary_column`` takes it."""
    return [metadata.schema.column(i).path for i in range(metadata.num_columns)].index(path)


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
        end = start + chunk.total_compressed_size
        for page in _pages(stream, end, chunk.total_uncompressed_size, codec):
            if page.kind == DICTIONARY_PAGE:
                if page.encoding not in (PLAIN, PLAIN_DICTIONARY):
                    raise UnsupportedLayout(f"{leaf.path}: dictionary encoding {page.encoding}")
                dictionary = _plain_values(page.body, 0, page.values)
            elif page.values > rows - len(values):
                raise UnsupportedLayout(f"{leaf.path}: a page of {page.values} values past the row group's {rows}")
            else:
                values.extend(_page_values(page, dictionary, leaf.max_definition_level))
    if len(values) != rows:
        raise UnsupportedLayout(f"{leaf.path}: its pages hold {len(values)} values for {rows} rows")
    return values


def _pages(stream: BinaryIO, end: int, most_bytes: int, codec: pa.Codec | None) -> Iterator[Page]:
    """The chunk's pages in order, from ``stream`` up to ``end``; no page decompresses to
    more than the chunk's ``most_bytes``."""
    thrift = _Thrift(stream)
    while stream.tell() < end:
        header = thrift.struct()
        kind, uncompressed, compressed = _ints(header, 1, 2, 3)
        if compressed > end - stream.tell() or uncompressed > most_bytes:
            raise UnsupportedLayout(f"a page of {compressed} bytes ({uncompressed} decompressed) at {stream.tell()}")
        if kind == INDEX_PAGE:
            stream.seek(compressed, 1)
            continue
        # No local name holds the compressed page: it is freed once decompressed, not kept
        # alive while the caller reads the next page.
        yield _page(kind, header, _read_page(stream, compressed), uncompressed, codec)


def _page(kind: int, header: dict, body: pa.Buffer, uncompressed: int, codec: pa.Codec | None) -> Page:
    if kind == DATA_PAGE:
        count, encoding, level_encoding = _ints(header.get(5), 1, 2, 3)
        return Page(kind, count, encoding, b"", 0, level_encoding, _decompress(codec, body, uncompressed))
    if kind == DICTIONARY_PAGE:
        count, encoding = _ints(header.get(7), 1, 2)
        return Page(kind, count, encoding, b"", 0, RLE, _decompress(codec, body, uncompressed))
    if kind == DATA_PAGE_V2:  # levels are never compressed, and the values may not be
        v2 = header.get(8)
        count, encoding, definition, repetition = _ints(v2, 1, 4, 5, 6)
        if definition + repetition > body.size:
            raise UnsupportedLayout(f"levels of {definition + repetition} bytes in a page of {body.size}")
        levels = body.slice(0, definition + repetition).to_pybytes()
        values = body.slice(len(levels))
        if v2.get(7, True) is not False:
            values = _decompress(codec, values, uncompressed - len(levels))
        return Page(kind, count, encoding, levels, repetition, RLE, values)
    raise UnsupportedLayout(f"page type {kind}")


def _decompress(codec: pa.Codec | None, body: pa.Buffer, size: int) -> pa.Buffer:
    return body if codec is None else codec.decompress(body, size)


def _page_values(page: Page, dictionary: list[pa.Buffer], max_level: int) -> list[pa.Buffer | None]:
    """A data page's values in row order, None where a row's definition level says null."""
    position = 0
    if not max_level:
        defined = np.full(page.values, True)
    else:
        if page.kind == DATA_PAGE_V2:
            levels = _hybrid(memoryview(page.levels)[page.level_offset :], max_level.bit_length(), page.values)
        elif page.level_encoding == RLE:
            (length,) = struct.unpack_from("<I", page.body, 0)
            levels = _hybrid(memoryview(page.body)[4 : 4 + length], max_level.bit_length(), page.values)
            position = 4 + length
        else:
            raise UnsupportedLayout(f"definition level encoding {page.level_encoding}")
        if levels.max(initial=0) > max_level:
            raise UnsupportedLayout(f"definition levels above the column's {max_level}")
        defined = levels == max_level
    count = int(defined.sum())
    if page.encoding == PLAIN:
        found = _plain_values(page.body, position, count)
    elif page.encoding in (PLAIN_DICTIONARY, RLE_DICTIONARY):
        width = memoryview(page.body).cast("B")[position]
        found = [dictionary[i] for i in _hybrid(memoryview(page.body)[position + 1 :], width, count)]
    else:
        raise UnsupportedLayout(f"value encoding {page.encoding}")
    values = iter(found)
    return [next(values) if here else None for here in defined]
