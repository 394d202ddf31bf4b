"""onnxruntime sessions and ONNX metadata, which both the export check and :mod:`detkit.export.runtime` need."""

from __future__ import annotations

import os
from typing import Any


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """``metadata_props`` of an ONNX file as a dict of strings."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def ort_session(path: str | os.PathLike[str] | bytes, threads: int = 0) -> Any:
    """A CPU onnxruntime session of a file (or of a serialised model, as bytes)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads > 0:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 4  # failures surface as exceptions with their message
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
