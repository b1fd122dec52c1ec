"""Test-time flip averaging on finished runs of the short CIFAR-10 (JPEG) recipe: how much
of the gap to issue 20's 88 % is left once every image is also seen mirrored.

The recipe leaves test-time flip out (``_recipe.yaml``): averaging an image's prediction
with its mirror image's doubles the cost of every exit, so it cannot be part of an
early-exit row. This script measures what it would give a network *without* exits, as a
figure beside the recipe's own, and is not a row of any table. Per run, on the final exit
and on the checkpoint the run kept (``model.pt``):

- val and test accuracy of the plain prediction (argmax of the logits, as eenet-train
  reports it: it must equal results.json, which is checked, so the figures are the run's);
- val and test accuracy of the flip average: the mean of the softmax of the image and of
  its horizontal mirror (Krizhevsky et al., "ImageNet Classification with Deep
  Convolutional Neural Networks", NeurIPS 2012, sec. 4.1, averaged their crops' and
  reflections' predictions the same way), at twice the cost.

Runs are read as data (:func:`eenet.runs.load_run`: config checked, weights with
``weights_only=True``); a folder still being trained is refused in one line.

    python experiments/cifar10_recipe/flip_tta.py experiments/runs/cifar10_recipe/resnet20_ema_40ep_s0 \
        --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from eenet.errors import EENetError
from eenet.reporting.experiment import save_report
from eenet.reporting.markdown import markdown_table
from eenet.reporting.results import finished_run_results
from eenet.runs import load_run


@torch.inference_mode()
def accuracies(net: torch.nn.Module, loader) -> dict[str, float]:
    """Plain and flip-averaged accuracy of the final exit over ``loader``."""
    plain = flip = total = 0
    for x, y in loader:
        logits = net(x).logits[-1]
        mirrored = net(torch.flip(x, dims=[-1])).logits[-1]
        avg = (logits.softmax(-1) + mirrored.softmax(-1)) / 2
        plain += int((logits.argmax(-1) == y).sum())
        flip += int((avg.argmax(-1) == y).sum())
        total += len(y)
    return {"plain": plain / total, "flip": flip / total, "samples": total}


def measure(run: Path, data_root: str | None) -> dict:
    reported_exits = finished_run_results(run)["exits"]  # the run's own figures, as data
    cfg, dm, net, _ = load_run(run, data_root)
    out = {"run": str(run), "epochs": cfg.trainer.max_epochs, "seed": cfg.seed,
           "ema_decay": (cfg.get("ema") or {}).get("decay")}
    for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        acc = accuracies(net, loader)
        reported = reported_exits[-1][f"{split}_accuracy"]
        # the same weights and data as eenet-train's evaluation: the plain figure must be it
        # (one sample's flip between CPUs at most; a larger gap means another checkpoint)
        if abs(acc["plain"] - reported) > 1.5 / acc["samples"]:
            raise EENetError(f"{run}: plain {split} accuracy {acc['plain']:.4f} is not the "
                             f"{reported:.4f} of its results.json: not the run's weights or data")
        out[f"{split}_accuracy"] = acc["plain"]
        out[f"{split}_accuracy_flip"] = acc["flip"]
        out[f"{split}_samples"] = acc["samples"]
    out["flip_cost_fraction"] = 2.0
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="finished eenet-train run folders")
    p.add_argument("--data-root", default=None, help="where the data is now, if it moved")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--suffix", default="", help="added to the JSON file's name")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        rows = [measure(r, args.data_root) for r in args.runs]
    except EENetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = markdown_table(
        ["run", "epochs", "EMA", "val %", "val % flip", "test %", "test % flip", "cost flip"],
        [[Path(r["run"]).name, r["epochs"], r["ema_decay"] or "-",
          f"{100 * r['val_accuracy']:.2f}", f"{100 * r['val_accuracy_flip']:.2f}",
          f"{100 * r['test_accuracy']:.2f}", f"{100 * r['test_accuracy_flip']:.2f}",
          f"{r['flip_cost_fraction']:.1f}"] for r in rows])
    print(text)
    out = save_report(__file__, {"runs": rows, "markdown": text}, args.suffix,
                      seeds=sorted({r["seed"] for r in rows}),
                      chosen_on={"checkpoint": "val"})
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
