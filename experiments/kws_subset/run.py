"""Keyword spotting end to end on the 1,000-clip Speech Commands subset (T-RecX on DS-CNN).

A small real data set, not the full Speech Commands: 700 training clips (a fifth
of them held out for validation) and 300 test clips, split with a fixed seed
(``kws12_subset``, the MLPerf Tiny int8 MFCC features). Published DS-CNN
accuracies (about 92% on the full test set) are not comparable. The pipeline:

1. train the MLPerf Tiny DS-CNN with a T-RecX exit after block 2
   (``conf/experiment/trecx_dscnn_kws.yaml``), and the same DS-CNN without exits;
2. calibrate max-softmax thresholds on val for a tolerance of 1 point below the
   model's own final exit, evaluate on test with the dynamic engine (``eenet-eval``);
3. export ONNX segments and check the onnxruntime runner against the engine on
   every test clip.

    python experiments/kws_subset/run.py   # results.json beside itself
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from eenet.data.batching import make_loader
from eenet.jobs.evaluate import evaluate
from eenet.runs import load_run
from eenet.export import export_segments
from eenet.inference import DynamicEngine
from eenet.export.onnx_runner import OnnxEarlyExitRunner
from eenet.policies import create_policy
from eenet.reporting.experiment import git_revision, save_report
from eenet.reporting.markdown import markdown_table
from eenet.config import compose_config
from eenet.jobs.train import train

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[2] / "shared" / "data"
RUNS = HERE.parent / "runs" / "kws_subset"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads per process")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--tolerance", type=float, default=1.0)
    args = p.parse_args()
    started = git_revision(__file__)  # the code this run starts with (commits may land before it ends)
    base = ["experiment=trecx_dscnn_kws", f"data_root={args.data}",
            f"trainer.max_epochs={args.epochs}", "trainer.enable_progress_bar=false", "logger=csv",
            f"threads={args.threads}", "overwrite=true"]  # a rerun replaces the runs
    plain, _ = train(compose_config(base + ["placement.stages=[]", "loss=multi_ce",
                                            "loss.weights=null"], output_dir=RUNS / "plain"))
    ee, _ = train(compose_config(base, output_dir=RUNS / "trecx"))
    ev = evaluate(compose_config([f"run={RUNS / 'trecx'}", f"tolerance={args.tolerance}",
                                  "policy=max_prob", "latency=true", "batch_size=64",
                                  "overwrite=true"],
                                 output_dir=RUNS / "trecx" / "eval", config_name="eval"))

    _, dm, net, cost = load_run(RUNS / "trecx")
    policy = create_policy("max_prob", ev["policy"]["thresholds"])
    manifest = export_segments(net, tuple(dm.input_size), RUNS / "trecx" / "onnx", policy, cost)
    runner = OnnxEarlyExitRunner(manifest)
    engine = DynamicEngine(net, policy, cost.fractions)
    same_pred = same_exit = n = 0
    for x, _ in make_loader(dm.test_dataset, 64, shuffle=False):
        out = engine(x)
        pred, exit_idx, _ = runner(x.numpy().astype(np.float32))
        same_pred += int((torch.from_numpy(np.asarray(pred)) == out.pred).sum())
        same_exit += int((torch.from_numpy(np.asarray(exit_idx)) == out.exit).sum())
        n += x.shape[0]

    t = ev["test"]
    rows = [["DS-CNN (no exits)", f"{100 * plain['exits'][-1]['test_accuracy']:.2f}", "1.000", "-"],
            ["DS-CNN + T-RecX exit, final exit only",
             f"{100 * ee['exits'][-1]['test_accuracy']:.2f}",
             f"{ee['exits'][-1]['cost_fraction']:.3f}", "-"],
            [f"DS-CNN + T-RecX exit, calibrated (tolerance {args.tolerance})",
             f"{100 * t['accuracy']:.2f}", f"{t['avg_cost_fraction']:.3f}",
             " / ".join(f"{100 * r:.1f}" for r in t["exit_rates"])]]
    table = markdown_table(["model", "test acc %", "avg cost fraction", "exit rates %"], rows)
    print(f"\nSpeech Commands subset (1,000 clips: {dm.split_sizes}), {args.epochs} epochs: "
          f"a small-data run, not comparable with published full-data accuracy\n")
    print(table)
    print(f"\nONNX runner vs PyTorch dynamic engine on {n} test clips: predictions equal "
          f"{100 * same_pred / n:.1f}%, exit indices equal {100 * same_exit / n:.1f}%")
    path = save_report(str(HERE / "results.json"), {"splits": dm.split_sizes, "plain": plain["test"],
                                  "plain_final_exit_accuracy": plain["exits"][-1]["test_accuracy"],
                                  "trecx": ee["test"], "trecx_exits": ee["exits"],
                                  "calibrated": t, "thresholds": ev["policy"]["thresholds"],
                                  "onnx": {"clips": n, "equal_predictions": same_pred / n,
                                           "equal_exits": same_exit / n,
                                           "manifest": str(manifest)},
                                  "latency": ev.get("latency"), "table": table,
                                  "settings": vars(args)},
                       seeds=sorted({plain["config"]["seed"], ee["config"]["seed"]}),
                       chosen_on={"thresholds": "val"}, source=__file__,
                       revision=started)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
