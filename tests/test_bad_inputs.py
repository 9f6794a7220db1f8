"""Every bad input fails with a clear UserError, in process and through ``python -m artefact prepare``.

Through the CLI: exit code 2, a one-line ``error:`` message, no traceback, and no output
folder or ``.partial`` leftover.
"""

from __future__ import annotations

import csv
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import Row, png_bytes, random_rows, run_cli, write_folder, write_parquet_by_hand
from PIL import Image

from artefact.config import ModelConfig
from artefact.data.cache import PrepareParams
from artefact.data.prepare import prepare
from artefact.data.sources.sample import check_id
from artefact.errors import UserError
from artefact.models import build_model, resolve_encoder


@dataclass
class Case:
    build: Callable[[Path], Path]
    """Writes the source under the given folder and returns its path."""
    message: str
    """A regex the error message must match."""
    params: dict = field(default_factory=dict)
    """PrepareParams fields; passed to the CLI as --flags too."""


def _folder(tweak: Callable[[Path, list[Row]], None] | None = None, count: int = 6, **kwargs) -> Callable:
    def build(base: Path) -> Path:
        rows = random_rows(count)
        root = write_folder(base / "src", rows, **kwargs)
        if tweak:
            tweak(root, rows)
        return root

    return build


def _rewrite_metadata(root: Path, rows: list[Row], columns=("id", "material", "content")) -> None:
    with (root / "metadata.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([{"id": row.id, "material": row.material, "content": row.content}[c] for c in columns])


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _save(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


def _bomb_png(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares width x height; the pixel data is never reached."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))


def _parquet(rows_fn: Callable[[list[Row]], list[Row]] | None = None, table_fn=None) -> Callable:
    def build(base: Path) -> Path:
        rows = random_rows(6)
        rows = rows_fn(rows) if rows_fn else rows
        shard = write_parquet_by_hand(base / "src" / "data" / "train-00000-of-00001.parquet", rows)
        if table_fn:
            table_fn(shard)
        return base / "src"

    return build


def _drop_column(name: str) -> Callable[[Path], None]:
    def change(shard: Path) -> None:
        pq.write_table(pq.read_table(shard).drop_columns([name]), shard)

    return change


def _annotation_as_binary(shard: Path) -> None:
    table = pq.read_table(shard)
    flat = pa.array([cell["bytes"] for cell in table.column("annotation").to_pylist()], pa.binary())
    pq.write_table(table.set_column(table.schema.get_field_index("annotation"), "annotation", flat), shard)


def _image_without_bytes_field(shard: Path) -> None:
    table = pq.read_table(shard)
    paths = pa.array([{"path": cell["path"]} for cell in table.column("image").to_pylist()])
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", paths), shard)


def _empty_bytes(shard: Path) -> None:
    table = pq.read_table(shard)
    cells = table.column("image").to_pylist()
    cells[3] = {"bytes": b"", "path": "x.png"}
    column = pa.array(cells, table.schema.field("image").type)
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", column), shard)


def _with_id(bad: str) -> Callable[[list[Row]], list[Row]]:
    def change(rows: list[Row]) -> list[Row]:
        rows[2].id = bad
        return rows

    return change


def _folder_id(bad: str) -> Callable[[Path, list[Row]], None]:
    def change(root: Path, rows: list[Row]) -> None:
        rows[1].id = bad
        _rewrite_metadata(root, rows)

    return change


CASES: dict[str, Case] = {
    "corrupt-image": Case(
        _folder(lambda root, rows: (root / "images" / "s002.png").write_bytes(b"definitely not a PNG" * 20)),
        r"images/s002\.png: cannot read the image",
    ),
    "truncated-image": Case(
        _folder(lambda root, rows: _truncate(root / "images" / "s003.png")),
        r"sample s003: the image data is corrupt or truncated",
    ),
    "truncated-mask": Case(
        _folder(lambda root, rows: _truncate(root / "annotations" / "s001.png")),
        r"sample s001 annotation: the image data is corrupt or truncated",
    ),
    "mask-size-differs": Case(
        _folder(lambda root, rows: _save(root / "annotations" / "s004.png", np.zeros((41, 48), np.uint8))),
        r"sample s004: the annotation is 48x41 but the image is 48x40",
    ),
    "mask-values-outside": Case(
        _folder(
            lambda root, rows: _save(
                root / "annotations" / "s002.png", np.array([[16] * 48, [200] * 48] * 20, np.uint8)
            )
        ),
        r"sample s002 annotation: the annotation holds values \[16, 200\] outside 0\.\.15 and 255",
    ),
    "rgb-mask": Case(
        _folder(lambda root, rows: _save(root / "annotations" / "s000.png", np.zeros((40, 48, 3), np.uint8))),
        r"annotation has mode 'RGB', but a single-channel index mask",
    ),
    "16-bit-mask-values-outside": Case(
        _folder(lambda root, rows: _save(root / "annotations" / "s000.png", np.full((40, 48), 300, np.uint16))),
        r"sample s000 annotation: the annotation holds values from 300 to 300, outside 0\.\.15 and 255",
    ),
    "metadata-without-material": Case(
        _folder(lambda root, rows: _rewrite_metadata(root, rows, ("id", "content"))),
        r"metadata\.csv: missing column\(s\) \['material'\]",
    ),
    "missing-annotation-file": Case(
        _folder(lambda root, rows: (root / "annotations" / "s005.png").unlink()),
        r"metadata\.csv:7: no annotation .*annotations/s005\.\*",
    ),
    "missing-image-file": Case(
        _folder(lambda root, rows: (root / "images" / "s001.png").unlink()),
        r"metadata\.csv:3: no image .*images/s001\.\*",
    ),
    "two-images-for-one-id": Case(
        _folder(lambda root, rows: _save(root / "images" / "s001.tif", rows[1].image)),
        r"metadata\.csv:3: .*images/s001\.png and .*images/s001\.tif are each the image of s001; keep one",
    ),
    "duplicate-id": Case(
        _folder(lambda root, rows: _rewrite_metadata(root, [*rows, rows[0]])),
        r"sample s000: the id appears twice",
    ),
    "empty-data-set": Case(_folder(count=0), r"the data set is empty"),
    "one-image-no-val-side": Case(_folder(count=1), r"the split leaves the val side empty"),
    "holdout-takes-everything": Case(_folder(), r"leaves the train side empty", {"holdout": "content=Line art"}),
    "holdout-matches-nothing": Case(
        _folder(),
        r"data\.holdout = 'material=Glass' matches no sample; material values here: \['Paper', 'Wood'\]",
        {"holdout": "material=Glass"},
    ),
    "id-parent-dir": Case(
        _folder(tweak=_folder_id("../evil")), r"metadata\.csv:3: id '\.\./evil' is not a safe file name"
    ),
    "id-separator": Case(_folder(tweak=_folder_id("a/b")), r"id 'a/b' is not a safe file name"),
    "id-absolute": Case(_folder(tweak=_folder_id("/etc/passwd")), r"id '/etc/passwd' is not a safe file name"),
    "id-dotdot": Case(_folder(tweak=_folder_id("..")), r"id '\.\.' is not a safe file name"),
    "id-nul": Case(_parquet(_with_id("a\x00b")), r"row 2: id 'a\\x00b' is not a safe file name"),
    "id-trailing-newline": Case(_parquet(_with_id("abc\n")), r"id 'abc\\n' is not a safe file name"),
    "id-backslash": Case(_parquet(_with_id("..\\x")), r"is not a safe file name"),
    "parquet-without-annotation": Case(
        _parquet(table_fn=_drop_column("annotation")), r"missing column\(s\) \['annotation'\]"
    ),
    "parquet-without-material": Case(
        _parquet(table_fn=_drop_column("material")), r"missing column\(s\) \['material'\]"
    ),
    "parquet-annotation-not-a-struct": Case(
        _parquet(table_fn=_annotation_as_binary), r"column 'annotation' must be an Image struct"
    ),
    "parquet-image-struct-without-bytes": Case(
        _parquet(table_fn=_image_without_bytes_field), r"column 'image' must be an Image struct \{bytes: binary"
    ),
    "parquet-truncated": Case(_parquet(table_fn=_truncate), r"not a readable parquet file"),
    "parquet-empty-image-cell": Case(
        _parquet(table_fn=_empty_bytes), r"row 3 \(id s003\): column 'image' has no image bytes"
    ),
    "decompression-bomb-header": Case(
        _folder(lambda root, rows: _bomb_png(root / "images" / "s001.png", 30_000, 30_000)),
        r"images/s001\.png: the image declares more than 250,000,000 pixels",
    ),
    "beyond-max-pixels": Case(_folder(), r"declares more than 1,000 pixels", {"max_pixels": 1000}),
    "just-beyond-max-pixels": Case(_folder(), r"declares more than 1,500 pixels", {"max_pixels": 1500}),
    "source-missing": Case(lambda base: base / "no-such-source", r"data source .*no-such-source does not exist"),
    "source-of-unknown-layout": Case(
        lambda base: (base / "src").mkdir() or base / "src", r"is neither ARTeFACT parquet shards"
    ),
}


def _cli_flags(params: dict) -> list[str]:
    flags = []
    for key, value in params.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


@pytest.mark.parametrize("name", list(CASES))
def test_bad_source_in_process(tmp_path: Path, name: str, bad_input_tried) -> None:
    case = CASES[name]
    source = case.build(tmp_path)
    with pytest.raises(UserError, match=case.message):
        prepare(source, tmp_path / "cache", PrepareParams(**case.params), log=lambda *_: None)
    assert not (tmp_path / "cache").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    bad_input_tried("data source (in process)")


@pytest.mark.parametrize("name", list(CASES))
def test_bad_source_through_the_cli(tmp_path: Path, name: str, bad_input_tried) -> None:
    case = CASES[name]
    source = case.build(tmp_path)
    out = tmp_path / "cache"
    result = run_cli("prepare", "--source", str(source), "--out", str(out), *_cli_flags(case.params))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert re.search(case.message, result.stderr), result.stderr
    assert not out.exists(), "no partial output"
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    bad_input_tried("data source (CLI)")


def test_the_valid_version_of_the_cases_prepares(tmp_path: Path) -> None:
    """The fixtures above are only broken where each case breaks them."""
    prepare(_folder()(tmp_path / "a"), tmp_path / "a" / "cache", PrepareParams(), log=lambda *_: None)
    prepare(_parquet()(tmp_path / "b"), tmp_path / "b" / "cache", PrepareParams(max_pixels=1920), log=lambda *_: None)


def test_out_folder_that_is_not_a_cache(tmp_path: Path) -> None:
    source = _folder()(tmp_path)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    result = run_cli("prepare", "--source", str(source), "--out", str(tmp_path / "busy"))
    assert result.returncode == 2 and "is not a cache" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["keep.txt"]


@pytest.mark.parametrize(
    "bad", ["../x", "a/b", "/abs", "a\x00b", "a\nb", "abc\n", "..", "a..b", "", ".hidden", "a b", 7, None]
)
def test_check_id_refuses_unsafe_names(bad, bad_input_tried) -> None:
    with pytest.raises(UserError, match="not a safe file name"):
        check_id(bad, "here")
    bad_input_tried("sample id")


@pytest.mark.parametrize("good", ["synth_0007", "IMG-12.v2", "a", "x" * 200])
def test_check_id_accepts_plain_names(good: str) -> None:
    assert check_id(good, "here") == good


def test_unknown_encoder_lists_close_matches_once() -> None:
    with pytest.raises(
        UserError, match=r"'convnext_tinny' is neither a timm model nor an SMP encoder\. Close matches: convnext_tiny,"
    ) as error:
        resolve_encoder("convnext_tinny")
    matches = str(error.value).split("Close matches: ")[1].rstrip(".").split(", ")
    assert len(matches) == len(set(matches)), "each suggestion once"
    with pytest.raises(UserError, match="See timm.list_models"):
        resolve_encoder("qqqqqqqq")


def test_resolutions_an_encoder_cannot_take() -> None:
    with pytest.raises(UserError, match=r"data\.resolution = 48 does not work with model\.encoder = tu-test_coatnet"):
        build_model(ModelConfig(encoder="tu-test_coatnet", heads=("fine",)), 48)


def test_rows_written_in_process_match_what_the_cases_assume() -> None:
    rows = random_rows(6)
    assert [r.id for r in rows] == [f"s00{i}" for i in range(6)]
    assert rows[0].image.shape == (40, 48, 3)
    assert png_bytes(rows[0].mask)[:4] == b"\x89PNG"
