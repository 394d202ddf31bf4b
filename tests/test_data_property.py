"""Property-based: random (often broken) annotations and image modes, through every format and both presets.

Whatever the input, the loader must not crash, every emitted box must be valid (finite, positive size, inside the
image) and equal to an independent oracle's (scaled by the resize), and every box that is not emitted must be counted
in the data report.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_data_support import CLASSES, WRITERS, Img, assert_valid_target, expected_boxes, xyxy_pixels

from detkit.data.build import build_dataset
from detkit.errors import DataError

SPECIAL = [0.0, -1e9, 1e9, math.nan, math.inf, -math.inf]
coords = st.one_of(st.floats(-30, 60, allow_nan=False), st.sampled_from(SPECIAL))
sizes = st.one_of(st.floats(-10, 60, allow_nan=False), st.sampled_from([0.0, 1e-9, 0.005, 1e9, math.nan, -5.0]))
annotations = st.tuples(coords, coords, sizes, sizes, st.sampled_from([1, 2, 3, 0, 4, 99]), st.booleans())
images = st.builds(
    Img,
    name=st.just(""),
    w=st.integers(4, 40),
    h=st.integers(4, 40),
    anns=st.lists(annotations, max_size=5),
    mode=st.sampled_from(["RGB", "RGB", "L", "RGBA", "P", "LA", "1", "I;16", "CMYK"]),
    exif=st.sampled_from([1, 1, 1, 6]),
    state=st.sampled_from(["ok"] * 5 + ["garbage"]),
)
PIPELINES = {
    "none": None,
    "detr_val": {"type": "detr_val", "size": 48, "max_size": 96},
    "lwdetr_val": {"type": "lwdetr_val", "size": 64},
    "detr_train": {"type": "detr_train", "scales": [32, 48, 64], "max_size": 96, "crop_resize_sizes": [40, 50],
                   "crop_min_size": 16, "crop_max_size": 40},
    "lwdetr_train": {"type": "lwdetr_train", "sizes": [64, 128], "crop_resize_sizes": [40, 50],
                     "crop_min_size": 16, "crop_max_size": 40},
}


@pytest.mark.parametrize("layout", ["coco", "coco_export", "yolo", "voc"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.lists(images, min_size=1, max_size=3), pipeline=st.sampled_from(list(PIPELINES)))
def test_random_annotations_never_crash_and_are_accounted_for(layout: str, spec: list[Img], pipeline: str) -> None:
    for k, img in enumerate(spec):
        img.name = f"{k}.{'jpg' if img.exif != 1 else 'png'}"
    fmt = "coco" if layout.startswith("coco") else layout
    with tempfile.TemporaryDirectory() as tmp:
        WRITERS[layout](Path(tmp), {"train": spec})
        ds = build_dataset({"root": tmp, "classes": CLASSES}, "train", PIPELINES[pipeline])
        report = ds.report
        assert report.boxes_in == sum(len(i.anns) for i in spec)
        readable = [i for i in spec if i.state == "ok"]
        if not readable:
            if len(ds):
                with pytest.raises(DataError, match="can be read"):
                    ds[0]
            return
        seen: dict[int, dict] = {}
        for index in range(len(ds)):
            image, target = ds[index]
            assert_valid_target(image, target, len(CLASSES))
            seen[target["image_id"]] = target
        assert set(seen) == {k + 1 for k, i in enumerate(spec) if i.state == "ok"}
        kept = 0
        for image_id, target in seen.items():
            img = spec[image_id - 1]
            boxes, labels = expected_boxes(img, fmt)
            kept += len(labels)
            assert target["orig_size"].tolist() == [img.h, img.w]
            if pipeline.endswith("train"):  # crops may cut boxes away; never add any
                assert len(target["labels"]) <= len(labels)
                continue
            h, w = target["size"].tolist()
            scaled = boxes * [w / img.w, h / img.h, w / img.w, h / img.h]
            assert target["labels"].tolist() == labels.tolist()
            np.testing.assert_allclose(xyxy_pixels(target), scaled, atol=1e-3 * max(w, h))
        # every box read is a training target or counted under a kind of the report
        assert report.boxes_kept == kept
        assert report.boxes_in == report.boxes_kept + report.dropped_boxes
        assert report.counts["unreadable_image"] == len(spec) - len(readable)
