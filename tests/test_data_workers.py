"""Data problems counted in DataLoader worker processes reach the data report: a training run (training and
evaluation loaders) over a data set with known bad images writes the same ``data_report.json``, the same counts
in the data sets' reports and the same data warnings in ``train.log`` with ``num_workers=0`` and with two
(persistent) workers."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.engine import tiny_config  # noqa: E402
from test_data_support import CLASSES, Img, write_coco  # noqa: E402

from detkit.data.build import build_dataset  # noqa: E402
from detkit.data.collate import collate  # noqa: E402
from detkit.engine.sampling import SeededDataset  # noqa: E402
from detkit.engine.trainer import train  # noqa: E402

BOX = (4, 4, 12, 10, 1, False)
TRAIN = [
    Img("a.png", 32, 32, [BOX]),
    Img("b.png", 32, 32, [(2, 2, 8, 8, 2, False)], state="garbage"),  # unreadable: replaced by the next image
    Img("c.png", 32, 32, [BOX], mode="L"),  # converted to RGB
    Img("d.jpg", 32, 24, [(3, 3, 10, 8, 3, False)], exif=6),  # EXIF rotated
    Img("e.png", 32, 32, [BOX, (36, 36, 8, 8, 2, False)]),  # the annotations will say 48 x 48: size mismatch
    Img("f.png", 32, 32, [BOX, (1, 1, 6, 6, 3, False)]),  # deleted after the data set is built: missing
    Img("g.png", 32, 32, [BOX, (5, 5, 0, 4, 1, False)]),  # a degenerate box (counted when building)
    Img("h.png", 32, 32, [(6, 6, 10, 10, 2, False)]),
]
VAL = [Img("v1.png", 32, 32, [BOX]), Img("v2.png", 32, 32, [BOX], state="garbage"), Img("v3.png", 32, 32, [BOX])]
#: what reading the images adds to the report (the rest is counted when the annotations are read)
READ_KINDS = {"unreadable_image", "missing_image", "converted_to_rgb", "exif_rotated", "size_mismatch"}


def bad_coco(root: Path) -> Path:
    write_coco(root, {"train": TRAIN, "val": VAL})
    path = root / "annotations/instances_train2017.json"
    data = json.loads(path.read_text())
    data["images"][4]["width"] = data["images"][4]["height"] = 48
    path.write_text(json.dumps(data))
    return root


def datasets(root: Path):
    """Fresh data sets (each run counts into its own reports); f.png disappears after building."""
    spec = {"root": str(root), "classes": CLASSES}
    train_ds, val_ds = build_dataset(spec, "train", None), build_dataset(spec, "val", None)
    (root / "train2017/f.png").unlink(missing_ok=True)
    return train_ds, val_ds


def data_lines(log: Path) -> list[str]:
    """The data set lines of ``train.log``: warnings about files and the summaries, without the time stamps."""
    names = [img.name for img in TRAIN + VAL]
    out = []
    for line in log.read_text().splitlines():
        message = re.sub(r"^\S+ \S+ ", "", line)
        if "data set " in message or any(name in message for name in names):
            out.append(message)
    return sorted(out)


def run(tmp_path: Path, root: Path, workers: int) -> tuple[dict, dict, list[str]]:
    train_ds, val_ds = datasets(root)
    cfg = tiny_config(tmp_path, [f"data.num_workers={workers}"], name=f"workers{workers}", epochs=2,
                      batch_size=2, eval_interval=1)
    train(cfg, datasets=(train_ds, val_ds))
    run_dir = tmp_path / f"workers{workers}"
    written = json.loads((run_dir / "data_report.json").read_text())
    return written, {"train": train_ds.report.as_dict(), "val": val_ds.report.as_dict()}, data_lines(
        run_dir / "train.log")


@pytest.mark.slow
def test_the_data_report_is_the_same_with_worker_processes(tmp_path):
    root = bad_coco(tmp_path / "data")
    written0, reports0, log0 = run(tmp_path, root, 0)
    bad_coco(root)  # f.png back for the second run's build
    written2, reports2, log2 = run(tmp_path, root, 2)
    counts = reports0["train"]["counts"]
    assert READ_KINDS <= set(counts)  # the data set really has problems that are found while reading images
    assert counts["unreadable_image"] == counts["missing_image"] == counts["size_mismatch"] == 1
    assert counts["boxes_of_dropped_images"] == 3 and counts["box_outside_image"] == 1
    assert reports0["val"]["counts"]["unreadable_image"] == 1
    assert written0 == json.loads(json.dumps(reports0))
    # the workers' counts reached the main process: same report object, same file, same log lines
    assert reports2 == reports0
    assert written2 == written0
    assert log2 == log0
    assert sum("cannot read image" in line and "b.png" in line for line in log2) == 1  # once, not once per worker
    assert any(line.startswith("WARNING data set coco/train: 1 missing_image") for line in log2)


def test_worker_counts_travel_with_the_batches(tmp_path):
    """The loader alone, over two epochs of persistent workers: each file is counted once, as in one process."""
    from detkit.data.report import CountedLoader, CountingCollate
    root = bad_coco(tmp_path / "data")
    reports = []
    for workers in (0, 2):
        train_ds, _ = datasets(root)
        loader = torch.utils.data.DataLoader(SeededDataset(train_ds), batch_size=2, num_workers=workers,
                                             collate_fn=CountingCollate(collate), persistent_workers=workers > 0)
        batches = CountedLoader(loader, train_ds.report)
        for _epoch in range(2):
            for images, mask, targets in batches:
                assert images.shape[0] == mask.shape[0] == len(targets) == 2
        reports.append(train_ds.report.as_dict())
        bad_coco(root)
    assert READ_KINDS <= set(reports[0]["counts"])
    assert reports[1] == reports[0]
    assert reports[0]["boxes_in"] == reports[0]["boxes_kept"] + reports[0]["dropped_boxes"]


def test_replayed_events_count_each_file_once():
    from detkit.data.report import DataReport

    worker_a, worker_b, main = DataReport("x"), DataReport("x"), DataReport("x")
    main.boxes_kept = 4
    main.class_counts.update([0, 1, 1, 2])
    journals = []
    for worker in (worker_a, worker_b):  # two workers both meet the same unreadable file
        with worker.capture() as events:
            worker.add_once("unreadable_image", "b.png", warn="cannot read image b.png",
                            also={"boxes_of_dropped_images": 2}, unkept_labels=[1, 2])
            worker.add("dropped_by_transform", "c.png", 3)
        journals.append(events)
    for events in journals:
        main.apply(events)
    assert main.counts["unreadable_image"] == 1 and main.counts["boxes_of_dropped_images"] == 2
    assert main.counts["dropped_by_transform"] == 6  # per sample, not per file
    assert main.boxes_kept == 2 and +main.class_counts == {0: 1, 1: 1}
    assert worker_a._journal is None  # capture ends with its block


def test_an_unwritable_data_report_is_one_warning_not_a_stop(tmp_path, caplog):
    train_ds, _ = datasets(bad_coco(tmp_path / "data"))
    cfg = tiny_config(tmp_path, epochs=2, batch_size=4)
    (tmp_path / "run" / "data_report.json").mkdir(parents=True)  # every write of the file fails
    with caplog.at_level("WARNING", logger="detkit"):
        train(cfg, datasets=(train_ds, None))
    assert sum("cannot write" in m and "data_report.json" in m for m in caplog.messages) == 1
    assert (tmp_path / "run" / "checkpoint_last.pth").is_file()
    assert any(m.startswith("data set coco/train: 1 missing_image") for m in caplog.messages)  # the log has it
