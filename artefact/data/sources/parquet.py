"""ARTeFACT parquet shards in the Hugging Face layout, and their download.

Each image column is the ``datasets`` Image feature: a struct ``{bytes, path}``. Shards
are read by Arrow one row group and one image column at a time, through a small read
buffer rather than a whole column chunk at once, and the encoded images are kept as
zero-copy slices of the column. A large image then costs about three copies of its
encoded bytes while it is read and one while it decodes (docs/performance.md, "Parquet
reading (issue 21)").
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from artefact.data.sources.sample import DEFAULT_MAX_PIXELS, Sample, check_id, open_image
from artefact.errors import UserError

HF_REPO = "danielaivanova/damaged-media"
READ_BUFFER = 1 << 20
"""Arrow reads a column chunk through a buffer of this size (with ``pre_buffer`` off). By
default it reads the whole chunk into memory first, and that copy of an image's compressed
page stays alive beside the decompressed page and the decoded values: four copies of the
image at once instead of three."""
REQUIRED_COLUMNS = ("id", "image", "annotation", "material", "content")
TEXT_COLUMNS = ("id", "material", "content")
IMAGE_COLUMNS = ("image", "annotation")
_IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", _IMAGE_STRUCT),
        ("annotation", _IMAGE_STRUCT),
        ("annotation_rgb", _IMAGE_STRUCT),
        ("material", pa.string()),
        ("content", pa.string()),
        ("type", pa.string()),
        ("damage_description", pa.string()),
        ("llava_description", pa.string()),
        ("verified_description", pa.string()),
    ]
)
_HF_FEATURES = {
    name: ({"_type": "Image"} if pa.types.is_struct(field.type) else {"dtype": "string", "_type": "Value"})
    for name, field in zip(SCHEMA.names, SCHEMA, strict=True)
}


def shard_paths(root: Path) -> list[Path]:
    """The parquet shards under a folder (``data/train-*.parquet`` or any ``*.parquet``)."""
    if root.is_file():
        return [root] if root.suffix == ".parquet" else []
    return sorted(root.rglob("*.parquet"))


def read_parquet(root: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[Sample]:
    """Yield samples from every shard, one row group's encoded images in memory at a time."""
    for shard in shard_paths(root):
        try:
            parquet = pq.ParquetFile(shard, pre_buffer=False, buffer_size=READ_BUFFER)
        except (pa.ArrowException, OSError) as error:
            raise UserError(f"{shard}: not a readable parquet file ({error}); re-download the shard.") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in parquet.schema_arrow.names]
        if missing:
            raise UserError(
                f"{shard}: missing column(s) {missing}; ARTeFACT shards have {', '.join(REQUIRED_COLUMNS)}."
            )
        for column in IMAGE_COLUMNS:
            if not _is_image_struct(parquet.schema_arrow.field(column).type):
                raise UserError(f"{shard}: column {column!r} must be an Image struct {{bytes: binary, path: string}}.")
        try:
            for row_number, row in enumerate(_rows(parquet)):
                yield _sample(row, f"{shard} row {row_number}", max_pixels)
        except (pa.ArrowException, OSError) as error:
            raise UserError(f"{shard}: the file is truncated or corrupt ({error}); re-download the shard.") from None


def _is_image_struct(kind: pa.DataType) -> bool:
    if not pa.types.is_struct(kind) or kind.get_field_index("bytes") < 0:
        return False
    encoded = kind.field("bytes").type
    return pa.types.is_binary(encoded) or pa.types.is_large_binary(encoded)


def _rows(parquet: pq.ParquetFile) -> Iterator[dict]:
    """Rows with each image cell as a buffer (or None), one row group at a time. Arrow's
    scratch memory goes back to the OS before any image is decoded: the allocator would
    otherwise keep it."""
    for group in range(parquet.num_row_groups):
        rows = parquet.read_row_group(group, columns=list(TEXT_COLUMNS), use_threads=False).to_pylist()
        for column in IMAGE_COLUMNS:
            table = parquet.read_row_group(group, columns=[column], use_threads=False)
            for row, cell in zip(rows, _encoded_images(table.column(column)), strict=True):
                row[column] = cell
            del table
            pa.default_memory_pool().release_unused()
        yield from rows


def _encoded_images(column: pa.ChunkedArray) -> Iterator[pa.Buffer | None]:
    """Each cell's ``bytes`` as a slice of the column's data buffer: to_pylist() or a
    scalar's as_buffer() would copy every encoded image."""
    for chunk in column.chunks:
        data = chunk.flatten()[chunk.type.get_field_index("bytes")]
        if len(data) == 0:
            continue
        _, offsets, values = data.buffers()
        width = np.int64 if pa.types.is_large_binary(data.type) else np.int32
        ends = np.frombuffer(offsets, width, len(data) + 1, data.offset * np.dtype(width).itemsize)
        for index, missing in enumerate(data.is_null().to_pylist()):
            if missing or ends[index + 1] == ends[index]:
                yield None
            else:
                yield values.slice(int(ends[index]), int(ends[index + 1] - ends[index]))


class _CellFile(io.RawIOBase):
    """An encoded image in an Arrow buffer as a read-only file, without copying it. Arrow's
    own BufferReader will not do: Pillow probes some formats (a palette TIFF, as ``datasets``
    stores P-mode masks) with ``readline``, which it lacks, and seeks past the end, which it
    refuses."""

    def __init__(self, buffer: pa.Buffer) -> None:
        super().__init__()
        self._data = memoryview(buffer).cast("B")
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        start = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._data)}[whence]
        if start + offset < 0:
            raise ValueError(f"seek to {start + offset}, before the start")
        self._position = start + offset
        return self._position

    def readinto(self, target: bytearray | memoryview) -> int:
        view = memoryview(target).cast("B")
        chunk = self._data[self._position : self._position + len(view)]
        view[: len(chunk)] = chunk
        self._position += len(chunk)
        return len(chunk)


def _sample(row: dict, where: str, max_pixels: int) -> Sample:
    sample_id = check_id(row["id"], where)
    images = {}
    for column in IMAGE_COLUMNS:
        if row[column] is None:
            raise UserError(f"{where} (id {sample_id}): column {column!r} has no image bytes.")
        cell = io.BufferedReader(_CellFile(row[column]))
        images[column] = open_image(cell, f"{where} (id {sample_id}) {column}", max_pixels)
    return Sample(
        id=sample_id,
        image=images["image"],
        mask=images["annotation"],
        material=row["material"] or "unknown",
        content=row["content"] or "unknown",
        group=sample_id,
    )


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class ParquetWriter:
    """Writes samples as ARTeFACT-schema shards (``data/train-000NN-of-000MM.parquet``)."""

    def __init__(self, root: Path, rows_per_shard: int = 16) -> None:
        self.root = root
        self.rows_per_shard = rows_per_shard
        self._rows: list[dict] = []

    def add(self, sample_id: str, image: Image.Image, mask: Image.Image, material: str, content: str) -> None:
        check_id(sample_id, str(self.root))
        rgb_mask = mask.convert("RGB")
        self._rows.append(
            {
                "id": sample_id,
                "image": {"bytes": _png_bytes(image), "path": f"{sample_id}.png"},
                "annotation": {"bytes": _png_bytes(mask), "path": f"{sample_id}_annotation.png"},
                "annotation_rgb": {"bytes": _png_bytes(rgb_mask), "path": f"{sample_id}_rgb.png"},
                "material": material,
                "content": content,
                "type": "synthetic",
                "damage_description": "",
                "llava_description": "",
                "verified_description": "",
            }
        )

    def close(self) -> None:
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        chunks = [self._rows[i : i + self.rows_per_shard] for i in range(0, len(self._rows), self.rows_per_shard)]
        metadata = {b"huggingface": json.dumps({"info": {"features": _HF_FEATURES}}).encode()}
        for index, chunk in enumerate(chunks):
            table = pa.Table.from_pylist(chunk, schema=SCHEMA.with_metadata(metadata))
            pq.write_table(table, data / f"train-{index:05d}-of-{len(chunks):05d}.parquet", row_group_size=4)


def download(out: Path) -> Path:
    """Fetch the ARTeFACT shards from the Hugging Face hub into ``out``."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise UserError("download needs huggingface_hub: pip install huggingface_hub") from None
    try:
        snapshot_download(HF_REPO, repo_type="dataset", local_dir=out, allow_patterns=["data/*.parquet", "README.md"])
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as error:
        raise UserError(
            f"could not download {HF_REPO} into {out}: {type(error).__name__}: {error}. This machine may"
            " have no route to the Hugging Face hub: download the data/*.parquet shards elsewhere and pass"
            " their folder to `prepare --source`."
        ) from None
    return out
