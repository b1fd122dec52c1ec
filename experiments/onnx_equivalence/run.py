"""Does the exported ONNX model decide like PyTorch? Runner vs dynamic engine on a whole test split.

Exports a trained run with the thresholds of an eenet-eval ``results.json``
(``eenet.export.export_segments``, into a temporary folder unless ``--out`` is
given), then runs the run's whole test split through the onnxruntime runner
(``eenet/onnx_runner.py``) and through the PyTorch dynamic engine, both with
real per-sample early exit at the same batch size. Prints and saves (JSON
beside this script): samples, share of equal predictions, share of equal exit
indices, and each side's accuracy and average cost fraction (fvcore MACs, one
fused multiply-add = one flop, exit heads included).

    python experiments/onnx_equivalence/run.py RUN_DIR RUN_DIR/eval/<time>/results.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from eenet.data.batching import make_loader
from eenet.runs import load_run
from eenet.export import export_segments
from eenet.inference import DynamicEngine
from eenet.export.onnx_runner import OnnxEarlyExitRunner
from eenet.policies import create_policy
from eenet.reporting.experiment import save_report
from eenet.reporting.results import read_policy
from eenet.reporting.markdown import markdown_table


def compare(run: str, results: str, out: Path, batch_size: int, threads: int) -> dict:
    ev = json.loads(Path(results).read_text())
    _, dm, net, cost = load_run(run)
    policy = create_policy(*read_policy(ev, results))
    manifest = export_segments(net, tuple(dm.input_size), out, policy, cost,
                               mean=dm.mean, std=dm.std)
    runner = OnnxEarlyExitRunner(manifest, threads=threads)
    engine = DynamicEngine(net, policy, cost.fractions)
    rows = {"onnx": ([], []), "torch": ([], [])}
    ys = []
    for x, y in make_loader(dm.test_dataset, batch_size, shuffle=False):
        pred, exit_idx, _ = runner(x.numpy())
        ref = engine(x)
        rows["onnx"][0].append(pred)
        rows["onnx"][1].append(exit_idx)
        rows["torch"][0].append(ref.pred.numpy())
        rows["torch"][1].append(ref.exit.numpy())
        ys.append(y.numpy())
    y = np.concatenate(ys)
    costs = np.array(cost.fractions)
    pred = {k: np.concatenate(v[0]) for k, v in rows.items()}
    exits = {k: np.concatenate(v[1]) for k, v in rows.items()}
    return {
        "run": str(Path(run).resolve()), "eval_results": str(Path(results).resolve()),
        "policy": {"name": policy.name, "thresholds": ev["policy"]["thresholds"]},
        "batch_size": batch_size, "samples": int(len(y)),
        "equal_predictions": float((pred["onnx"] == pred["torch"]).mean()),
        "equal_exits": float((exits["onnx"] == exits["torch"]).mean()),
        **{f"{k}_accuracy": float((pred[k] == y).mean()) for k in pred},
        **{f"{k}_avg_cost": float(costs[exits[k]].mean()) for k in exits},
        **{f"{k}_exit_rates": (np.bincount(exits[k], minlength=net.num_exits) / len(y)).tolist()
           for k in exits},
        "cost_convention": cost.convention,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="folder of a finished eenet-train run")
    p.add_argument("results", help="results.json of eenet-eval (policy and thresholds)")
    p.add_argument("--out", default=None, help="keep the export here (default: a temporary folder)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.out:
        payload = compare(args.run, args.results, Path(args.out), args.batch_size, args.threads)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            payload = compare(args.run, args.results, Path(tmp), args.batch_size, args.threads)
    print(markdown_table(
        ["samples", "equal predictions %", "equal exit indices %", "accuracy onnx %",
         "accuracy torch %", "avg cost onnx", "avg cost torch"],
        [[payload["samples"], 100 * payload["equal_predictions"], 100 * payload["equal_exits"],
          100 * payload["onnx_accuracy"], 100 * payload["torch_accuracy"],
          payload["onnx_avg_cost"], payload["torch_avg_cost"]]]))
    seed = json.loads((Path(args.run) / "results.json").read_text())["config"]["seed"]
    # the thresholds come from eenet-eval, which calibrates them on val
    path = save_report(str(Path(__file__).with_name("results.json")), payload, seeds=[seed],
                       chosen_on={"thresholds": "val"}, source=__file__)
    print(f"\nSaved {path}")


if __name__ == "__main__":
    main()
