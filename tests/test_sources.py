"""Each raw source read back: the folder layout, parquet shards (library writer and by hand)."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import IMAGE_STRUCT, REPO, Row, _png_chunk, random_rows, write_folder, write_parquet_by_hand
from PIL import Image

from artefact.data.prepare import read_source
from artefact.data.sources.folder import FolderWriter, read_folder
from artefact.data.sources.parquet import ParquetWriter, _encoded_images, read_parquet, shard_paths
from artefact.errors import UserError


def _same(sample, row: Row) -> None:
    assert sample.id == row.id
    assert np.array_equal(np.asarray(sample.image.convert("RGB")), row.image)
    assert np.array_equal(np.asarray(sample.mask), row.mask)
    assert sample.material == row.material
    assert sample.content == row.content


def test_folder_layout_round_trips(tmp_path: Path) -> None:
    rows = random_rows(5, materials=("Paper", "Wood", "Glass"))
    rows[1].content = "Photographic depiction"
    write_folder(tmp_path / "src", rows)
    samples = list(read_folder(tmp_path / "src"))
    assert [s.id for s in samples] == [r.id for r in rows], "metadata.csv order is kept"
    for sample, row in zip(samples, rows, strict=True):
        _same(sample, row)
        assert sample.group == row.id, "without a group column each image is its own group"
        assert sample.mask.mode == "L"


def test_folder_group_column_and_blank_metadata(tmp_path: Path) -> None:
    rows = random_rows(3)
    rows[0].group = rows[1].group = "scan-A"
    rows[2].material = ""
    write_folder(tmp_path / "src", rows, columns=("id", "material", "content", "group"))
    samples = list(read_folder(tmp_path / "src"))
    assert [s.group for s in samples] == ["scan-A", "scan-A", rows[2].id]
    assert samples[2].material == "unknown"


def test_folder_finds_other_image_suffixes(tmp_path: Path) -> None:
    rows = random_rows(2)
    rows[0].image[:] = 128  # flat, so JPEG reproduces it almost exactly
    write_folder(tmp_path / "src", rows, image_format="jpg")
    sample = next(read_folder(tmp_path / "src"))
    assert sample.image.format == "JPEG"
    assert np.abs(np.asarray(sample.image).astype(int) - 128).max() <= 2


def test_folder_reader_is_lazy(tmp_path: Path) -> None:
    """Samples stream one at a time: a broken third row only fails when it is reached."""
    rows = random_rows(3)
    write_folder(tmp_path / "src", rows)
    (tmp_path / "src" / "annotations" / f"{rows[2].id}.png").unlink()
    samples = read_folder(tmp_path / "src")
    assert next(samples).id == rows[0].id
    assert next(samples).id == rows[1].id
    with pytest.raises(UserError, match=r"no annotation .*annotations/s002\.\*"):
        next(samples)


def test_folder_writer_output_is_read_back(tmp_path: Path) -> None:
    rows = random_rows(2)
    writer = FolderWriter(tmp_path / "src")
    for row in rows:
        writer.add(row.id, Image.fromarray(row.image), Image.fromarray(row.mask), row.material, row.content)
    assert not (tmp_path / "src" / "metadata.csv").exists(), "metadata.csv is written last"
    writer.close()
    for sample, row in zip(read_folder(tmp_path / "src"), rows, strict=True):
        _same(sample, row)


def test_parquet_writer_uses_the_hugging_face_schema(tmp_path: Path) -> None:
    rows = random_rows(5)
    writer = ParquetWriter(tmp_path / "pq", rows_per_shard=2)
    for row in rows:
        writer.add(row.id, Image.fromarray(row.image), Image.fromarray(row.mask), row.material, row.content)
    writer.close()
    shards = sorted((tmp_path / "pq" / "data").glob("*.parquet"))
    assert [s.name for s in shards] == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    schema = pq.read_schema(shards[0])
    for column in ("image", "annotation", "annotation_rgb"):
        assert schema.field(column).type == IMAGE_STRUCT
    for column in ("id", "material", "content", "type", "damage_description", "verified_description"):
        assert schema.field(column).type == pa.string()
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert features["image"] == {"_type": "Image"} and features["id"]["_type"] == "Value"
    first = pq.read_table(shards[0]).to_pylist()[0]
    assert first["annotation"]["path"] and isinstance(first["annotation"]["bytes"], bytes)
    with Image.open(io.BytesIO(first["annotation_rgb"]["bytes"])) as rgb:
        assert rgb.mode == "RGB"

    samples = list(read_parquet(tmp_path / "pq"))
    assert len(samples) == 5
    for sample, row in zip(samples, rows, strict=True):
        _same(sample, row)
        assert sample.group == row.id


def test_parquet_written_by_hand_is_read(tmp_path: Path) -> None:
    """The reader follows the HF schema, not ParquetWriter's quirks (order, extras, null paths)."""
    rows = random_rows(7, materials=("Canvas", "Textile"))
    write_parquet_by_hand(tmp_path / "hf" / "data" / "train-00000-of-00002.parquet", rows[:4], row_group_size=3)
    write_parquet_by_hand(tmp_path / "hf" / "data" / "train-00001-of-00002.parquet", rows[4:], row_group_size=1)
    assert len(shard_paths(tmp_path / "hf")) == 2
    samples = list(read_parquet(tmp_path / "hf"))
    assert [s.id for s in samples] == [r.id for r in rows]
    for sample, row in zip(samples, rows, strict=True):
        _same(sample, row)
    # A single shard file works as a source too.
    single = tmp_path / "hf" / "data" / "train-00001-of-00002.parquet"
    assert [s.id for s in read_parquet(single)] == [r.id for r in rows[4:]]


def test_parquet_with_large_binary_images_is_read(tmp_path: Path) -> None:
    """Arrow's large_binary (64-bit offsets) holds the same encoded images."""
    rows = random_rows(3)
    shard = tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"
    write_parquet_by_hand(shard, rows, row_group_size=2)
    table = pq.read_table(shard)
    wide = pa.struct([("bytes", pa.large_binary()), ("path", pa.string())])
    for column in ("image", "annotation"):
        table = table.set_column(table.schema.get_field_index(column), column, table.column(column).cast(wide))
    pq.write_table(table, shard, row_group_size=2)
    samples = list(read_parquet(tmp_path / "pq"))
    for sample, row in zip(samples, rows, strict=True):
        _same(sample, row)


def test_encoded_images_are_views_of_the_column_not_copies() -> None:
    """A 200 MP image's encoded bytes can be hundreds of MB: each copy would add to prepare's peak."""
    cells = [{"bytes": b"first", "path": "a.png"}, None, {"bytes": b"", "path": None}, {"bytes": None, "path": None}]
    cells.append({"bytes": b"last image", "path": "e.png"})
    # Two chunks, the second a slice with an offset, as Arrow hands out row groups.
    column = pa.chunked_array([pa.array(cells[:2], IMAGE_STRUCT), pa.array([None, *cells[2:]], IMAGE_STRUCT).slice(1)])
    views = list(_encoded_images(column))
    assert [None if v is None else v.to_pybytes() for v in views] == [b"first", None, None, None, b"last image"]
    for view, chunk in ((views[0], column.chunks[0]), (views[4], column.chunks[1])):
        values = chunk.field("bytes").buffers()[2]
        assert values.address <= view.address < values.address + values.size


def test_read_source_dispatches_on_layout(tmp_path: Path) -> None:
    rows = random_rows(2)
    write_folder(tmp_path / "folder", rows)
    write_parquet_by_hand(tmp_path / "shards" / "x.parquet", rows)
    assert [s.id for s in read_source(tmp_path / "folder", 10**6)] == [r.id for r in rows]
    assert [s.id for s in read_source(tmp_path / "shards", 10**6)] == [r.id for r in rows]
    (tmp_path / "neither").mkdir()
    with pytest.raises(UserError, match="neither ARTeFACT parquet shards"):
        read_source(tmp_path / "neither", 10**6)
    with pytest.raises(UserError, match="does not exist"):
        read_source(tmp_path / "missing", 10**6)


PEAK_OF_ONE_SAMPLE = """
import sys
from pathlib import Path
from artefact.data.sources.parquet import read_parquet

def kb(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0])

next(read_parquet(Path(sys.argv[1])))  # the reader's and Pillow's own start-up memory
before = kb("VmRSS")
sample = next(read_parquet(Path(sys.argv[2])))
print((kb("VmHWM") - before) * 1024, (kb("VmRSS") - before) * 1024)
"""


def _unread_png(colour_type: int, data: bytes) -> bytes:
    """A 4000 x 4000 PNG whose pixel data is ``data``: it is opened here, never decoded."""
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 4000, 4000, 8, colour_type, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + _png_chunk(b"IDAT", data)


def _shard_of_one(folder: Path, image_bytes: int) -> Path:
    image = _unread_png(2, np.random.default_rng(1).bytes(image_bytes))
    table = pa.table({"id": ["huge"], "material": ["Paper"], "content": ["Line art"]})
    table = table.append_column("image", pa.array([{"bytes": image, "path": None}], IMAGE_STRUCT))
    table = table.append_column("annotation", pa.array([{"bytes": _unread_png(0, b""), "path": None}], IMAGE_STRUCT))
    folder.mkdir()
    pq.write_table(table, folder / "shard.parquet")  # snappy, the image in a dictionary page
    return folder


def test_a_large_cell_is_held_three_times_while_read_and_once_while_it_decodes(tmp_path: Path) -> None:
    """Arrow reading a whole column chunk at once holds four copies of a large image's bytes;
    through its read buffer, three, and then only the cell itself is kept."""
    size = 64 << 20
    warm, huge = _shard_of_one(tmp_path / "warm", 1000), _shard_of_one(tmp_path / "huge", size)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", PEAK_OF_ONE_SAMPLE, str(warm), str(huge)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    peak, held = (int(value) / size for value in done.stdout.split())
    print(f"in copies of the encoded image: {peak:.2f} at peak while read, {held:.2f} held while it decodes")
    assert peak <= 3.3
    assert held <= 1.15
