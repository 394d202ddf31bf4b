"""The data report: every problem a data set had, counted, with example file names.

Bad data never stops an epoch and never passes silently. Problems found while reading annotations are counted when
the data set is built (and summarised in one warning); problems found while reading images (unreadable file,
size mismatch) are counted by the process that reads them, with one warning per file. ``detkit data check`` finds
all of them up front.

Counts made in DataLoader worker processes travel back with the batches: a data set wrapped for loading
(:func:`load_counting`, used by the engine's ``SeededDataset``) records what loading one sample counted as a list of
*events* (:meth:`DataReport.capture`), the collate function (:class:`CountingCollate`) joins them per batch, and the
loader wrapper (:class:`CountedLoader`) replays them into the main process's report (:meth:`DataReport.apply`).
Replaying deduplicates per file the way counting in one process does, and the warnings are logged by the main
process, so the report and the log are the same for any ``num_workers`` (persistent workers included).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

logger = logging.getLogger("detkit.data")


@dataclass(frozen=True)
class Kind:
    """One kind of problem: what happens to the item and a one-line explanation."""

    name: str
    unit: str  # "box" or "image"
    action: str  # "dropped", "excluded", "kept", "clipped", "replaced", "converted"
    help: str


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("missing_image", "image", "dropped", "image file does not exist"),
        Kind("unreadable_image", "image", "replaced", "image file cannot be decoded (another sample is returned)"),
        Kind("bad_annotation_file", "image", "dropped", "annotation file of an image cannot be parsed"),
        Kind("boxes_of_dropped_images", "box", "dropped", "boxes that belonged to a dropped image"),
        Kind("invalid_box", "box", "dropped", "box coordinates missing or not finite (NaN/inf)"),
        Kind("degenerate_box", "box", "dropped", "box with zero or negative width or height"),
        Kind("box_outside_image", "box", "dropped", "box entirely outside the image"),
        Kind("unknown_category", "box", "dropped", "category id / class name not in the class list"),
        Kind("orphan_annotation", "box", "dropped", "annotation refers to an image id that does not exist"),
        Kind("bad_annotation", "box", "dropped", "malformed annotation entry or label line"),
        Kind("crowd", "box", "excluded", "crowd annotation: not a training target, kept as ignore region for eval"),
        Kind("difficult", "box", "excluded", "VOC 'difficult' object: not a training target, ignore region for eval"),
        Kind("clipped_box", "box", "clipped", "box partly outside the image, clipped to it"),
        Kind("empty_image", "image", "kept", "image without boxes, kept as background"),
        Kind("converted_to_rgb", "image", "converted", "grayscale / RGBA / palette / 16-bit image converted to RGB"),
        Kind("exif_rotated", "image", "converted", "EXIF orientation applied"),
        Kind("size_mismatch", "image", "clipped", "decoded image size differs from the annotation; boxes clipped"),
        Kind("dropped_by_transform", "box", "dropped", "box lost by an augmentation (crop) — informational"),
    )
}

#: box kinds whose boxes never reach a training target
DROPPED_BOX_KINDS = tuple(k for k, v in KINDS.items() if v.unit == "box" and v.action in ("dropped", "excluded"))
#: kinds that are real data problems (the others are informational)
PROBLEM_KINDS = tuple(
    k for k in KINDS if k not in ("crowd", "difficult", "empty_image", "exif_rotated", "dropped_by_transform")
)

MAX_EXAMPLES = 5

#: what loading a sample counted, in the order it happened: ``("add", kind, example, n)`` or
#: ``("once", kind, file, n, warn, also, unkept_labels)`` (plain tuples and lists: they cross process boundaries)
Event = Sequence[Any]


class DataReport:
    """Counts per problem kind with up to :data:`MAX_EXAMPLES` example file names each, plus data set statistics.

    ``boxes_in`` counts every box annotation read, ``boxes_kept`` those that became training targets; every other box
    is counted under one kind of :data:`DROPPED_BOX_KINDS`.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.num_images = 0
        self.boxes_in = 0
        self.boxes_kept = 0
        self.class_counts: Counter[int] = Counter()  # label -> number of kept boxes
        self._box_sides: list[np.ndarray] = []  # sqrt(area) in pixels of kept boxes
        self._seen: set[tuple[str, str]] = set()
        self._journal: list[Event] | None = None  # set while :meth:`capture` records events
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # locks do not pickle (DataLoader workers started with spawn)
        state = dict(self.__dict__)
        del state["_lock"]
        state["_journal"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- counting -----------------------------------------------------------------------------------------------
    def add(self, kind: str, example: str | None = None, n: int = 1) -> None:
        """Count ``n`` items of ``kind`` (an unknown kind is a bug: KeyError)."""
        KINDS[kind]  # noqa: B018 - validate the name
        if n <= 0:
            return
        self._count(kind, example, n)
        if self._journal is not None:
            self._journal.append(("add", kind, example, int(n)))

    def _count(self, kind: str, example: str | None, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            self.counts[kind] += n
            if example is not None:
                shown = self.examples.setdefault(kind, [])
                if example not in shown and len(shown) < MAX_EXAMPLES:
                    shown.append(example)

    def add_once(self, kind: str, file: str, n: int = 1, warn: str | None = None, *,
                 also: Mapping[str, int] | None = None, unkept_labels: Sequence[int] = ()) -> bool:
        """Count ``kind`` for ``file`` only the first time this process sees the pair (images are read every epoch).

        That first time, it also counts ``also`` (``{kind: n}``, with ``file`` as the example), takes
        ``unkept_labels`` (the labels of boxes that no longer reach a target) off ``boxes_kept`` and the class
        counts, and logs ``warn`` as a warning. Returns whether it was new.
        """
        KINDS[kind]  # noqa: B018 - validate the name
        for other in also or {}:
            KINDS[other]  # noqa: B018
        with self._lock:
            if (kind, file) in self._seen:
                return False
            self._seen.add((kind, file))
        self._count(kind, file, n)
        for other, count in (also or {}).items():
            self._count(other, file, int(count))
        labels = [int(v) for v in unkept_labels]
        if labels:
            with self._lock:
                self.boxes_kept -= len(labels)
                self.class_counts.subtract(labels)
        if self._journal is not None:  # a worker: the main process logs the warning when it replays the event
            self._journal.append(("once", kind, file, int(n), warn, dict(also or {}), labels))
        elif warn:
            logger.warning("%s: %s", self.name, warn)
        return True

    # -- counts made in other processes ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def capture(self) -> Iterator[list[Event]]:
        """Record every count made inside the block as events (the counts are made here too); warnings are left to
        whoever replays the events (:meth:`apply`). Used around loading one sample in a DataLoader worker."""
        journal: list[Event] = []
        previous, self._journal = self._journal, journal
        try:
            yield journal
        finally:
            self._journal = previous

    def apply(self, events: Iterable[Event]) -> None:
        """Replay events recorded by :meth:`capture` (in this or another process): per-file counts that this report
        has already seen are skipped, so replaying the events of several workers counts each file once."""
        for event in events:
            what, *args = event
            if what == "add":
                kind, example, n = args
                self.add(str(kind), example, int(n))
            elif what == "once":
                kind, file, n, warn, also, labels = args
                self.add_once(str(kind), str(file), int(n), warn, also=dict(also), unkept_labels=list(labels))
            else:
                raise ValueError(f"unknown data report event {what!r}")

    def add_kept(self, labels: np.ndarray, boxes_xyxy: np.ndarray) -> None:
        """Record the boxes that became training targets (statistics for the histograms)."""
        self.boxes_kept += len(labels)
        self.class_counts.update(int(v) for v in labels)
        if len(boxes_xyxy):
            wh = boxes_xyxy[:, 2:] - boxes_xyxy[:, :2]
            self._box_sides.append(np.sqrt(np.clip(wh[:, 0] * wh[:, 1], 0, None)).astype(np.float32))

    # -- reading ------------------------------------------------------------------------------------------------
    @property
    def dropped_boxes(self) -> int:
        return sum(self.counts[k] for k in DROPPED_BOX_KINDS)

    @property
    def num_problems(self) -> int:
        return sum(self.counts[k] for k in PROBLEM_KINDS)

    def box_sides(self) -> np.ndarray:
        return np.concatenate(self._box_sides) if self._box_sides else np.zeros(0, np.float32)

    def as_dict(self) -> dict[str, Any]:
        """Plain-data view (json-serialisable): counts, examples and statistics."""
        return {
            "name": self.name,
            "num_images": self.num_images,
            "boxes_in": self.boxes_in,
            "boxes_kept": self.boxes_kept,
            "dropped_boxes": self.dropped_boxes,
            "counts": {k: self.counts[k] for k in KINDS if self.counts[k]},
            "examples": {k: list(v) for k, v in self.examples.items() if self.counts[k]},
            "class_counts": {int(k): int(v) for k, v in sorted(self.class_counts.items())},
        }

    def summary(self) -> str:
        """One line: ``coco/train: 2 degenerate_box (e.g. a.jpg), 1 crowd``."""
        parts = []
        for kind in KINDS:
            n = self.counts[kind]
            if n:
                ex = self.examples.get(kind)
                parts.append(f"{n} {kind}" + (f" (e.g. {ex[0]})" if ex else ""))
        return f"{self.name}: " + (", ".join(parts) if parts else "no problems")

    def log_summary(self) -> None:
        """Warn once about the problems found so far (informational kinds alone are logged at info level)."""
        if self.num_problems:
            logger.warning("data set %s", self.summary())
        elif any(self.counts.values()):
            logger.info("data set %s", self.summary())

    # -- text tables for `detkit data check` ---------------------------------------------------------------------
    def problems_table(self) -> str:
        rows = [("kind", "count", "action", "examples")]
        for kind, info in KINDS.items():
            n = self.counts[kind]
            if n:
                rows.append((kind, str(n), info.action, ", ".join(self.examples.get(kind, []))))
        if len(rows) == 1:
            return "  no problems found"
        return format_table(rows)

    def class_table(self, classes: list[str]) -> str:
        total = max(1, sum(self.class_counts.values()))
        rows = [("label", "class", "boxes", "share")]
        for label, name in enumerate(classes):
            n = self.class_counts.get(label, 0)
            if n or name != "N/A":
                rows.append((str(label), name, str(n), f"{100 * n / total:5.1f}% {_bar(n / total)}"))
        return format_table(rows)

    def size_table(self) -> str:
        sides = self.box_sides()
        edges = [0, 8, 16, 32, 64, 128, 256, 512, float("inf")]
        total = max(1, len(sides))
        rows = [("sqrt(area) px", "boxes", "share")]
        for lo, hi in zip(edges[:-1], edges[1:]):
            n = int(((sides >= lo) & (sides < hi)).sum())
            label = f"{lo:g}-{hi:g}" if hi != float("inf") else f">={lo:g}"
            rows.append((label, str(n), f"{100 * n / total:5.1f}% {_bar(n / total)}"))
        coco = [("small (<32)", sides < 32), ("medium (32-96)", (sides >= 32) & (sides < 96)),
                ("large (>=96)", sides >= 96)]
        for label, sel in coco:
            rows.append((label, str(int(sel.sum())), f"{100 * sel.sum() / total:5.1f}%"))
        return format_table(rows)


def _bar(fraction: float, width: int = 20) -> str:
    return "#" * int(round(fraction * width))


def format_table(rows: Iterable[tuple[str, ...]]) -> str:
    """Left-aligned text table with a rule under the header row."""
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Counts made in DataLoader workers
# ---------------------------------------------------------------------------------------------------------------------


class CountedSample(NamedTuple):
    """A sample loaded in a DataLoader worker, with the events its loading counted in the data set's report."""

    sample: Any
    events: list[Event]


class CountedBatch(NamedTuple):
    """A collated batch with the events of its samples (a named tuple, so ``pin_memory`` keeps its type)."""

    batch: Any
    events: list[Event]


def load_counting(dataset: Any, load: Callable[[], Any]) -> Any:
    """``load()`` (one sample of ``dataset``); inside a DataLoader worker, a :class:`CountedSample` carrying what it
    counted in ``dataset.report``, which the worker's copy of the report would otherwise keep to itself."""
    report = getattr(dataset, "report", None)
    if not isinstance(report, DataReport) or torch.utils.data.get_worker_info() is None:
        return load()
    with report.capture() as events:
        sample = load()
    return CountedSample(sample, events)


class CountingCollate:
    """Wraps a collate function: the events of :class:`CountedSample` items are joined into a :class:`CountedBatch`
    around the batch that ``collate_fn`` makes of the bare samples (plain samples give the plain batch)."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: Sequence[Any]) -> Any:
        if not any(isinstance(item, CountedSample) for item in items):
            return self.collate_fn(list(items))
        events: list[Event] = []
        samples = []
        for item in items:
            if isinstance(item, CountedSample):
                events.extend(item.events)
                item = item.sample
            samples.append(item)
        return CountedBatch(self.collate_fn(samples), events)


class CountedLoader:
    """Iterates a DataLoader built with :class:`CountingCollate`, replaying each batch's events into ``report``
    (the data set's :class:`DataReport`; anything else is ignored) before yielding the bare batch. ``len()`` and
    ``num_workers`` are the loader's."""

    def __init__(self, loader: Any, report: Any) -> None:
        self.loader = loader
        self.report = report if isinstance(report, DataReport) else None

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def num_workers(self) -> int:
        return int(self.loader.num_workers)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            if isinstance(batch, CountedBatch):
                if self.report is not None:
                    self.report.apply(batch.events)
                batch = batch.batch
            yield batch
