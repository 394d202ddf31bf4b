"""Build the train / val data sets from the resolved ``data`` config section."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from detkit.data.datasets.base import DetectionDataset
from detkit.data.datasets.coco import looks_like_coco
from detkit.data.datasets.voc import looks_like_voc
from detkit.data.datasets.yolo import find_yolo_yaml
from detkit.data.transforms import build_transforms
from detkit.errors import DataError
from detkit.registry import DATASETS

#: (format, test, what the test looks for) in detection order
LAYOUTS = (
    ("coco", looks_like_coco, "COCO: annotations/instances_*.json or <split>/_annotations.coco.json"),
    ("yolo", lambda root: find_yolo_yaml(root) is not None, "YOLO: data.yaml"),
    ("voc", looks_like_voc, "VOC: Annotations/ with JPEGImages/ or ImageSets/Main/ (or VOC*/Annotations/)"),
)


def detect_format(root: str | Path) -> str:
    """The format of the data set under ``root``; a :class:`DataError` names the layouts looked for."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"data root does not exist or is not a folder: {path}")
    for name, test, _ in LAYOUTS:
        if test(path):
            return name
    looked = "; ".join(what for _, _, what in LAYOUTS)
    raise DataError(f"cannot detect the data set format of {path}; looked for {looked}. Set data.format explicitly.")


def data_config(data_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """``data_cfg`` completed with the :class:`~detkit.config.DataConfig` defaults."""
    from detkit.config import DataConfig, merge, to_container

    return merge(dataclasses.asdict(DataConfig()), dict(to_container(data_cfg) or {}))


def build_dataset(
    data_cfg: Mapping[str, Any], split: str, transforms: Mapping[str, Any] | None,
    reference: DetectionDataset | None = None,
) -> DetectionDataset:
    """One split. ``reference`` (the train split) fixes the class map so that every split agrees on labels."""
    cfg = data_config(data_cfg)
    fmt = cfg["format"]
    pipeline = build_transforms(transforms)
    if fmt == "auto":
        fmt = "synthetic" if cfg["root"] is None else detect_format(cfg["root"])
    if fmt == "synthetic":
        return DATASETS.build({"type": "synthetic", **dict(cfg["synthetic"] or {})}, split=split,
                              transforms=pipeline, label_map=cfg["label_map"])
    if cfg["root"] is None:
        raise DataError(f"data.format is {fmt!r} but data.root is not set")
    return DATASETS.build(
        {"type": fmt}, root=str(cfg["root"]), split=split, transforms=pipeline, label_map=cfg["label_map"],
        classes=cfg.get("classes"), reference=reference,
    )


def build_datasets(
    data_cfg: Mapping[str, Any], train: bool = True
) -> tuple[DetectionDataset | None, DetectionDataset]:
    """``(train_ds or None, val_ds)`` for the ``data`` section; ``train=False`` builds only the validation split.

    Every data set has ``classes``, ``cat_ids``, ``report`` and ``coco_gt()``; ``len(ds.classes)`` is the number of
    classes a model trained on it needs.
    """
    cfg = data_config(data_cfg)
    train_ds = build_dataset(cfg, cfg["train_split"], cfg["train_transforms"]) if train else None
    val_ds = build_dataset(cfg, cfg["val_split"], cfg["val_transforms"], reference=train_ds)
    return train_ds, val_ds
