"""The one load report: what a load did to each key, and where the weights came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["WeightsReport"]


@dataclass
class WeightsReport:
    """What one load did to each key (model-level key names).

    ``loaded``, ``converted``, ``resized``, ``class_rows`` and ``reinitialised`` partition the model's keys;
    ``unexpected`` lists the file's keys the model has no use for. A re-initialised key with a shape note was in the
    file with another shape (``reshaped``); one without was not in the file (``missing``). A strict copy
    (:func:`detkit.weights.state.load_state_dict`) fills ``loaded`` / ``reinitialised`` / ``unexpected`` only.
    """

    target: str = "model"  # "model" or "backbone"
    source: str = ""  # what the config said: a path, a URL or a weights name
    file: str = ""  # the local file read
    sha256: str = ""
    format: str = ""  # detkit | official DETR | official LW-DETR | torchvision | timm | state dict
    entry: str = ""  # the checkpoint entry the weights came from (model, ema, ema_model, ...)
    renamed: str = ""  # how file keys were renamed, e.g. "encoder.* -> backbone.*"
    loaded: list[str] = field(default_factory=list)  # copied unchanged under the same name
    converted: list[str] = field(default_factory=list)  # copied from a key of another name (official layout, prefix)
    resized: list[str] = field(default_factory=list)  # copied after a shape change (pos-embed grid, query groups)
    class_rows: list[str] = field(default_factory=list)  # class heads whose rows were matched by class name
    reinitialised: list[str] = field(default_factory=list)  # left as the architecture initialises them
    unexpected: list[str] = field(default_factory=list)  # keys of the file the model has no use for
    matched_classes: list[str] = field(default_factory=list)  # "name" or "name <- checkpoint class"
    new_classes: list[str] = field(default_factory=list)  # classes whose rows were initialised
    notes: dict[str, str] = field(default_factory=dict)  # key -> what happened (shapes, resize)

    @property
    def used(self) -> int:
        """How many of the model's keys took a value from the file."""
        return len(self.loaded) + len(self.converted) + len(self.resized) + len(self.class_rows)

    @property
    def missing(self) -> list[str]:
        """Keys of the model that the file does not have (left as initialised)."""
        return [k for k in self.reinitialised if k not in self.notes]

    @property
    def reshaped(self) -> list[str]:
        """``"key (file shape)->(model shape)"`` for the keys left as initialised because their shapes differ."""
        return [f"{k} {self.notes[k]}" for k in self.reinitialised if k in self.notes]

    @property
    def ok(self) -> bool:
        """True when every key of the model and of the file found its counterpart with the same shape."""
        return not (self.reinitialised or self.unexpected)

    def table(self) -> str:
        def show(keys: list[str], n: int = 6) -> str:
            keys = [f"{k} {self.notes[k]}" if k in self.notes else k for k in keys]
            return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")

        what = f"{self.format}" + (f", entry '{self.entry}'" if self.entry else "")
        lines = [f"{self.target} weights from {self.source}" + (f" ({what})" if what else "")]
        if self.file and self.file != self.source:
            lines.append(f"  file            {self.file}")
        if self.sha256:
            lines.append(f"  sha256          {self.sha256[:16]}")
        if self.renamed:
            lines.append(f"  keys            {self.renamed}")
        rows = [("loaded", self.loaded, False), ("converted", self.converted, True), ("resized", self.resized, True),
                ("class rows", self.class_rows, True), ("re-initialised", self.reinitialised, True),
                ("unexpected", self.unexpected, True)]
        for name, keys, detail in rows:
            lines.append(f"  {name:<15} {len(keys):>6}  {show(keys) if detail else ''}".rstrip())
        if self.class_rows or self.new_classes:
            lines.append(f"    classes kept  {len(self.matched_classes):>6}  {show(self.matched_classes, 8)}".rstrip())
            lines.append(f"    classes new   {len(self.new_classes):>6}  {show(self.new_classes, 8)}".rstrip())
        return "\n".join(lines)

    def detail(self) -> str:
        """Every missing, unexpected and reshaped key (up to 20 of each), one line per kind."""
        parts = []
        for name, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                           ("shape mismatch", self.reshaped)):
            if keys:
                parts.append(f"{name}: " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
        return "\n".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """Provenance and outcome, JSON-serialisable (stored in the run directory and the checkpoint)."""
        return {"target": self.target, "source": self.source, "file": self.file, "sha256": self.sha256,
                "format": self.format, "entry": self.entry, "renamed": self.renamed, "loaded": len(self.loaded),
                "converted": len(self.converted), "resized": self.resized, "class_rows": self.class_rows,
                "matched_classes": self.matched_classes, "new_classes": self.new_classes,
                "reinitialised": self.reinitialised, "unexpected": self.unexpected}
