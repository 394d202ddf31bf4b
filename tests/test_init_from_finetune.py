"""A short fine-tune through the trainer: train the tiny engine-test detector on classes A, then start a run on a
class set that shares some names from that checkpoint (``model.init_from``). The shared classes start better than
from scratch, new classes start from the architecture's init, the loss goes down, and the run directory and its
checkpoints say where the weights came from."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.engine import tiny_config  # noqa: E402
from support.tiny_detector import TinyShapes  # noqa: E402

from detkit.weights.io import load_checkpoint_file  # noqa: E402
from detkit.engine.trainer import Trainer, train  # noqa: E402

RGB = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40),
       "magenta": (200, 60, 200)}


class NamedShapes(TinyShapes):
    """TinyShapes whose colour follows the class *name*, so a class keeps its look in another class list."""

    def _make(self, i: int) -> list[tuple[int, list[float]]]:
        rng = np.random.default_rng(self.seed * 100003 + i)
        side = float(rng.uniform(0.45, 0.7)) * self.size  # one big square: its colour is the image's main colour
        x0, y0 = (float(v) for v in rng.uniform(0, self.size - side, 2))
        return [(int(rng.integers(0, len(self.classes))), [x0, y0, side, side])]

    def image(self, i: int) -> np.ndarray:
        rng = np.random.default_rng(self.seed * 100003 + i + 7)
        img = rng.integers(0, 60, (self.size, self.size, 3)).astype(np.uint8)
        for label, (x, y, w, h) in self.annotations[i]:
            img[int(y):int(y + h), int(x):int(x + w)] = RGB[self.classes[label]]
        return img


@torch.no_grad()
def class_accuracy(model: torch.nn.Module, ds: NamedShapes, among: tuple[str, ...] | None = None) -> dict[str, float]:
    """Per class (of ``among``, default all): how often the queries matched to its boxes rank the right class first
    among the classes ``among``."""
    model.eval()
    images, mask, targets = ds.collate_fn([ds[i] for i in range(len(ds))])
    out = model(images, mask)
    idx = model.criterion.match(out["pred_logits"], out["pred_boxes"], targets)
    cols = [ds.classes.index(n) for n in (among or ds.classes)]
    pred = torch.tensor(cols)[out["pred_logits"][..., cols].argmax(-1)]
    per: dict[str, list[float]] = {}
    for b, (q, g) in enumerate(idx):
        for qi, gi in zip(q.tolist(), g.tolist()):
            label = int(targets[b]["labels"][gi])
            if label in cols:
                per.setdefault(ds.classes[label], []).append(float(pred[b, qi] == label))
    return {k: sum(v) / len(v) for k, v in per.items()}


@torch.no_grad()
def val_loss(model: torch.nn.Module, ds: NamedShapes) -> float:
    model.eval()
    images, mask, targets = ds.collate_fn([ds[i] for i in range(len(ds))])
    return float(model.criterion(model(images, mask), targets)["loss"])


def test_finetune_from_another_class_set_starts_better_and_improves(tmp_path):
    old = ("red", "green", "blue")
    train(tiny_config(tmp_path, ["model.dropout=0.0"], name="base", epochs=20, eval_interval=-1, lr=3e-3,
                      lr_backbone=3e-3, batch_size=8, clip_max_norm=1.0),
          datasets=(NamedShapes(32, classes=old), NamedShapes(4, seed=1, flip=False, classes=old)))
    base = tmp_path / "base" / "checkpoint_last.pth"

    new = ("yellow", "blue", "red")  # red and blue move to other rows; yellow is new
    data = (NamedShapes(32, seed=2, classes=new), NamedShapes(30, seed=3, flip=False, classes=new))
    over = ["runtime.tensorboard=false"]
    tune = dict(name="ft", epochs=8, eval_interval=-1, lr=2e-3, lr_backbone=2e-3, batch_size=8, clip_max_norm=1.0)
    ft = Trainer(tiny_config(tmp_path, [f"model.init_from={base}", "model.dropout=0.0", *over], **tune), datasets=data)
    scratch = Trainer(tiny_config(tmp_path, over, name="scratch", epochs=1, eval_interval=-1), datasets=data)

    report = ft.pretrained[0]
    assert report["format"] == "detkit" and report["source"] == str(base)
    assert report["matched_classes"] == ["blue", "red"] and report["new_classes"] == ["yellow"]
    assert report["class_rows"] == ["class_embed.weight", "class_embed.bias"]
    src = load_checkpoint_file(base)["model"]
    w = ft.unwrapped_model.state_dict()["class_embed.weight"]
    assert torch.equal(w[1], src["class_embed.weight"][2]) and torch.equal(w[2], src["class_embed.weight"][0])
    assert torch.equal(w[3], src["class_embed.weight"][3])  # no-object row

    shared = ("blue", "red")
    start = class_accuracy(ft.unwrapped_model, data[1], among=shared)
    fresh = class_accuracy(scratch.unwrapped_model, data[1], among=shared)
    print("shared-class accuracy at the start: fine-tune", start, "scratch", fresh)
    for name in shared:  # told apart from the start: their rows were matched by name, not copied by index
        assert start[name] >= 0.8 and start[name] > fresh[name] + 0.2, (start, fresh)
    before = class_accuracy(ft.unwrapped_model, data[1])
    loss_before = val_loss(ft.unwrapped_model, data[1])
    assert loss_before < 0.8 * val_loss(scratch.unwrapped_model, data[1])

    from detkit import plugins

    losses: list[float] = []

    class Record:
        @plugins.hookimpl
        def detkit_after_step(self, trainer, step, losses):  # noqa: ANN001
            record.append(losses["loss"])

    record = losses
    rec = Record()
    plugins.plugin_manager().register(rec)
    try:
        ft.fit()
    finally:
        plugins.plugin_manager().unregister(rec)
    k = len(losses) // 3
    assert np.mean(losses[-k:]) < np.mean(losses[:k]), losses
    after = class_accuracy(ft.unwrapped_model, data[1])
    loss_after = val_loss(ft.unwrapped_model, data[1])
    print("after fine-tuning", after, "validation loss", loss_before, "->", loss_after)
    assert loss_after < 0.95 * loss_before
    assert min(after["red"], after["blue"]) >= 0.8, (before, after)

    run = tmp_path / "ft"
    assert json.loads((run / "pretrained.json").read_text())[0]["sha256"] == report["sha256"]
    ckpt = load_checkpoint_file(run / "checkpoint_last.pth")
    assert ckpt["pretrained"][0]["source"] == str(base) and ckpt["classes"] == list(new)
    # resuming that run does not load the starting weights again, and keeps their provenance
    resumed = Trainer(tiny_config(tmp_path, [f"model.init_from={base}", "model.dropout=0.0", "train.resume=auto",
                                             *over], **tune), datasets=data)
    assert torch.equal(resumed.unwrapped_model.state_dict()["class_embed.weight"], ckpt["model"]["class_embed.weight"])
    assert resumed.pretrained == ckpt["pretrained"]
