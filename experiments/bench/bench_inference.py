"""Wall-clock speed-up of real early exit on the MNIST test set, against the plain resnet20.

The early-exit model and its thresholds come from ``experiments/mnist_budget/run.py`` (resnet20
with 2 exits trained as in Core, thresholds calibrated on val); the plain model
is the resnet20 without exits. Over the whole MNIST test set, with 2 threads,
the plain network and the dynamic engine are timed alternately ``--reps`` times
at batch 1 and at batch 256 (median of the runs). Reported: measured speed-up
t_plain / t_dynamic, the ideal speed-up 1 / (average cost fraction of the
test samples, fvcore MACs, exit heads included), and their ratio (the realised
share of the saving). Targets: ratio >= 0.8 at batch 1 and >= 0.85 at batch 256.

MACs are not time: early layers at full resolution move more memory per MAC,
and at batch 1 every layer pays a fixed dispatch cost. So the script also
measures, in the same run, the time to reach and evaluate each exit
(``eenet.inference.latency``) and reports the latency ceiling: the speed-up a
perfect engine would reach, t_plain / sum_i (exit rate i x time to exit i),
and the share of that ceiling the engine realises.

``--fold-bn`` folds every BatchNorm into the convolution before it in both
networks (``eenet.inference.fold_batchnorm``) and saves ``bench_inference_folded.json``.

    python experiments/bench/bench_inference.py
    python experiments/bench/bench_inference.py --fold-bn
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from eenet.data.batching import make_loader
from eenet.runs import load_run
from eenet.inference import DynamicEngine, exit_latency_table, fold_batchnorm
from eenet.policies import create_policy
from eenet.reporting.experiment import save_report
from eenet.reporting.results import read_policy
from eenet.reporting.markdown import markdown_table

HERE = Path(__file__).resolve().parent
RUNS = HERE.parent / "runs"  # the runs of experiments/mnist_budget and mnist_core


def timed(fn, batches) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x in batches:
            fn(x)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ee-run", default=str(RUNS / "mnist_budget" / "ee"))
    p.add_argument("--eval", default=None, help="results.json of eenet-eval with the thresholds "
                   "(default: <ee-run>/eval_budget/results.json)")
    p.add_argument("--plain-run", default=str(RUNS / "mnist_core" / "plain"))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    p.add_argument("--tag", default="", help="appended to the JSON's name (another --ee-run)")
    p.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into the convolutions "
                   "of both networks first")
    p.add_argument("--samples", type=int, default=None, help="first n test samples (default all)")
    args = p.parse_args()
    torch.set_num_threads(2)

    eval_path = Path(args.eval or Path(args.ee_run) / "eval_budget" / "results.json")
    ev = json.loads(eval_path.read_text())
    _, dm, net, cost = load_run(args.ee_run)
    _, _, plain_net, plain_cost = load_run(args.plain_run)
    plain = plain_net.backbone.eval()
    if args.fold_bn:
        net, folded = fold_batchnorm(net)
        plain, folded_plain = fold_batchnorm(plain)
        print(f"folded {folded} Conv-BN pairs (early-exit network), {folded_plain} (plain)")
    policy = create_policy(*read_policy(ev, str(eval_path)))
    engine = DynamicEngine(net, policy, cost)  # idle exits' heads are skipped and not charged
    n = args.samples or len(dm.test_dataset)

    rows, results = [], []
    for bs in args.batch_sizes:
        batches, seen = [], 0
        for x, _ in make_loader(dm.test_dataset, bs, shuffle=False):
            if seen >= n:
                break
            batches.append(x[: n - seen])
            seen += batches[-1].shape[0]
        exits = torch.cat([engine(x).exit for x in batches])
        rates = (torch.bincount(exits, minlength=net.num_exits).double() / exits.numel()).tolist()
        avg_cost = float(engine.costs[exits].double().mean())
        ideal = 1 / avg_cost
        timed(plain, batches[:3])  # warm-up
        timed(engine, batches[:3])
        t_plain, t_dyn = [], []
        for _ in range(args.reps):
            t_plain.append(timed(plain, batches))
            t_dyn.append(timed(engine, batches))
        lat = exit_latency_table(net, batches[0].shape[1:], batch_sizes=[bs], repeats=30,
                                 min_seconds=2.0)
        reach = sum(r * row["us_per_sample"] for r, row in zip(rates, lat))
        ceiling = statistics.median(t_plain) / exits.numel() * 1e6 / reach
        speedup = statistics.median(t_plain) / statistics.median(t_dyn)
        per_rep = statistics.median(a / b for a, b in zip(t_plain, t_dyn))
        ratio = speedup / ideal
        target = 0.8 if bs == 1 else 0.85
        results.append({"batch_size": bs, "samples": int(exits.numel()), "plain_s": t_plain,
                        "dynamic_s": t_dyn, "speedup": speedup, "speedup_per_rep_median": per_rep,
                        "avg_cost_fraction": avg_cost, "ideal_speedup": ideal,
                        "realised_share": ratio, "target": target, "meets_target": ratio >= target,
                        "exit_rates": rates, "exit_latency": lat,
                        "latency_ceiling_speedup": ceiling,
                        "share_of_latency_ceiling": speedup / ceiling})
        rows.append([bs, exits.numel(), f"{statistics.median(t_plain):.2f}",
                     f"{statistics.median(t_dyn):.2f}", f"{speedup:.2f}", f"{avg_cost:.4f}",
                     f"{ideal:.2f}", f"{ratio:.3f}", f">= {target}", f"{ceiling:.2f}",
                     f"{speedup / ceiling:.3f}",
                     " / ".join(f"{100 * r:.1f}" for r in rates)])
        print(rows[-1], flush=True)
    table = markdown_table(["batch", "samples", "plain s", "dynamic s", "speed-up",
                            "avg cost fraction", "ideal 1/cost", "realised share", "target",
                            "latency ceiling", "share of ceiling", "exit rates %"], rows)
    print(f"\nMNIST test, resnet20 with exits ({ev['policy']['name']} thresholds "
          f"{ev['policy']['thresholds']}, calibrated on val) vs plain resnet20; "
          f"{torch.get_num_threads()} threads, median of {args.reps}"
          f"{'; BatchNorm folded into the convolutions of both' if args.fold_bn else ''}\n")
    print(table)
    path = save_report(__file__, {"ee_run": args.ee_run, "plain_run": args.plain_run,
                                  "policy": ev["policy"], "results": results, "table": table,
                                  "plain_backbone_macs": plain_cost.backbone_macs,
                                  "settings": vars(args)},
                       suffix=args.tag + ("_folded" if args.fold_bn else ""),
                       chosen_on={"thresholds": "val"})  # eenet-eval's, calibrated on val
    print(f"saved {path}")


if __name__ == "__main__":
    main()
