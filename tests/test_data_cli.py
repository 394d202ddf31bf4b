"""``detkit data check`` reports every problem up front, with histograms; exit status says whether it is usable."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from test_data_bad import BOXES
from test_data_support import Img, write_coco, write_voc, write_yolo

from detkit.data.cli import main
from detkit.errors import DataError


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out=out), out.getvalue()


def test_check_reports_every_problem_with_counts_and_histograms(tmp_path: Path) -> None:
    write_coco(tmp_path, {
        "train": [Img("a.png", 20, 20, BOXES), Img("b.png", 30, 20, [(1, 1, 4, 4, 1, False)], state="garbage"),
                  Img("c.png", 200, 100, [(10, 10, 150, 80, 2, False)], mode="L"),
                  Img("d.jpg", 24, 12, [(1, 1, 4, 4, 3, False)], exif=6)],
        "val": [Img("v.png", 20, 20, [(1, 1, 5, 5, 1, False)]), Img("w.png", 20, 20)],
    })
    code, text = run("check", str(tmp_path))
    assert code == 0 and text.rstrip().endswith("usable")
    assert "format: coco" in text and "== split 'train'" in text and "== split 'val'" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("  ") and line.split()}
    expected = {"unreadable_image": "1", "invalid_box": "2", "degenerate_box": "3", "box_outside_image": "2",
                "unknown_category": "1", "crowd": "1", "clipped_box": "2", "converted_to_rgb": "1",
                "exif_rotated": "1", "boxes_of_dropped_images": "1", "empty_image": "1"}
    for kind, count in expected.items():
        assert rows[kind][1] == count, (kind, rows.get(kind))
    assert rows["unreadable_image"][3] == "b.png" and rows["converted_to_rgb"][3] == "c.png"
    assert "4 images listed, 3 readable; 15 boxes read, 5 kept as targets" in text
    # class histogram (train label 1 'b': one clipped box of a.png and c.png's box) and COCO size buckets
    assert "sqrt(area) px" in text and "small (<32)" in text and "large (>=96)" in text
    assert any(line.split()[:3] == ["1", "b", "2"] for line in text.splitlines() if line.startswith("  "))
    assert "2 images listed, 2 readable; 1 boxes read, 1 kept as targets" in text  # the val split


def test_check_other_formats_and_not_usable(tmp_path: Path) -> None:
    write_yolo(tmp_path / "y", {"train": [Img("a.png", 20, 20, [(1, 1, 5, 5, 1, False)])],
                                "val": [Img("b.png", 20, 20)]})
    code, text = run("check", str(tmp_path / "y"))
    assert code == 0 and "format: yolo" in text
    write_voc(tmp_path / "v", {"train": [Img("a.png", 20, 20, state="garbage")]})
    code, text = run("check", str(tmp_path / "v"), "--format", "voc", "--decode")
    assert code == 1
    assert "split 'train' has no readable image" in text and "split 'val' cannot be loaded" in text
    assert "ImageSets/Main/val.txt" in text


def test_check_missing_root_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        run("check", str(tmp_path / "nope"))


def test_detkit_data_dispatch(tmp_path: Path, capsys) -> None:
    from detkit.cli import main as detkit_main

    write_coco(tmp_path, {"train": [Img("a.png", 20, 20, [(1, 1, 5, 5, 1, False)])],
                          "val": [Img("b.png", 20, 20, [(1, 1, 5, 5, 1, False)])]})
    assert detkit_main(["data", "check", str(tmp_path)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("usable")
    assert detkit_main(["data", "check", str(tmp_path / "missing")]) != 0  # the CLI prints the DataError
    assert "does not exist" in capsys.readouterr().err
