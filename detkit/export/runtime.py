"""Run an exported ONNX file like a checkpoint: :class:`OnnxDetector` (``detkit predict --runtime onnxruntime``).

The file's metadata (written by ``detkit export``) gives the class names and the preprocessing (the evaluation
transform), so an ONNX file is predicted, tiled and drawn exactly as its checkpoint would be::

    det = OnnxDetector("model.onnx", threshold=0.5, tile=640, overlap=0.2)
    pred = det.predict("aerial.tif")
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from detkit.errors import CheckpointError
from detkit.export.session import ort_session, read_metadata
from detkit.predict.api import Detector


class OnnxDetector(Detector):
    """A :class:`~detkit.predict.api.Detector` whose model is an ONNX file run by onnxruntime (CPU).

    :param path: a file written by ``detkit export`` (its metadata holds ``classes`` and ``preprocessing``).
    :param threads: onnxruntime intra-op threads (0: its default).
    Other parameters as :class:`~detkit.predict.api.Detector`.
    """

    def __init__(self, path: str | os.PathLike[str], threshold: float = 0.5, batch_size: int = 4, threads: int = 0,
                 tile: int | str | None = "auto", overlap: float | None = None, whole_image: bool = False) -> None:
        self.path = Path(os.path.expanduser(str(path)))
        if not self.path.is_file():
            raise CheckpointError(f"ONNX file not found: {self.path}")
        try:
            meta = read_metadata(self.path)
        except Exception as e:  # onnx raises its own DecodeError for a file that is not a model
            raise CheckpointError(f"{self.path} is not an ONNX model ({type(e).__name__}: {e})") from e
        if "classes" not in meta or "preprocessing" not in meta:
            raise CheckpointError(f"{self.path} has no detkit metadata (classes, preprocessing); export it with "
                                  "`detkit export`")
        self.metadata = meta
        classes = [str(c) for c in json.loads(meta["classes"])]
        resize = json.loads(meta["preprocessing"]).get("resize")
        self.session = ort_session(self.path, threads)
        self.model = None  # type: ignore[assignment]
        self.loaded = None
        self.cat_ids = [i + 1 for i in range(len(classes))]  # COCO ids start at 1, as default_cat_ids
        self._configure(classes, resize, threshold, batch_size, tile, overlap, whole_image)

    def _detect(self, arrays: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The graph (model and post-processing) on a batch; images whose preprocessed sizes differ run apart
        (the graph takes no padding mask)."""
        tensors = [self.preprocess(a).numpy() for a in arrays]
        out: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = [None] * len(arrays)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault(t.shape, []).append(i)
        for indices in groups.values():
            images = np.stack([tensors[i] for i in indices]).astype(np.float32)
            sizes = np.array([arrays[i].shape[:2] for i in indices], dtype=np.int64)
            scores, labels, boxes = self.session.run(["scores", "labels", "boxes"],
                                                     {"images": images, "orig_sizes": sizes})
            for k, i in enumerate(indices):
                out[i] = (boxes[k], scores[k], labels[k].astype(np.int64))
        return [o for o in out if o is not None]
