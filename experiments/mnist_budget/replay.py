"""Replay committed mnist_budget operating points through today's dynamic engine (issue 17).

The staged resnet20 now runs through ``EarlyExitNetwork.walk()``, the one
mechanism that carries live values between segments (graph backbones, T-RecX).
This script checks that the mechanism changed no decision: it reads the
thresholds that ``experiments/mnist_budget/run.py`` chose on val at an earlier
commit (default ``afb226a``, the last figures measured before the walk landed),
runs the MNIST test split through today's engine with exactly those thresholds
on the same trained run (``experiments/runs/mnist_budget/ee``, model.pt
unchanged), and compares accuracy, exit rates and average cost fraction with
what that commit recorded. Entropy thresholds of results files older than
format 2 (``eenet.reporting.results``) bound the entropy H; today's entropy
score is -H, so they are negated.

    python experiments/mnist_budget/replay.py [--rev afb226a] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import torch

from eenet.data.batching import make_loader
from eenet.inference import DynamicEngine
from eenet.policies import create_policy
from eenet.reporting.experiment import save_report
from eenet.reporting.markdown import markdown_table
from eenet.runs import load_run

HERE = Path(__file__).resolve().parent
RUN = HERE.parent / "runs" / "mnist_budget" / "ee"
FILES = ("results.json", "results_vs_plain.json")


def committed(rev: str, name: str) -> dict:
    rel = f"experiments/mnist_budget/{name}"
    out = subprocess.run(["git", "-C", str(HERE), "show", f"{rev}:{rel}"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"error: git show {rev}:{rel} failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rev", default="afb226a", help="commit whose recorded operating points are replayed")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not (RUN / "model.pt").is_file():
        raise SystemExit(f"error: {RUN} has no model.pt; run experiments/mnist_budget/run.py first")
    _, dm, net, cost = load_run(RUN)
    rows, records = [], []
    for name in FILES:
        old = committed(args.rev, name)
        policy = old["chosen_policy"]
        thresholds = list(old["val_calibration"][policy]["chosen"]["thresholds"])
        if policy == "entropy":  # pre-format-2 files bound H; the score is -H now
            thresholds = [-float(t) for t in thresholds]
        engine = DynamicEngine(net, create_policy(policy, thresholds), cost)
        n, correct = 0, 0
        counts = torch.zeros(len(engine.costs), dtype=torch.long)
        for x, y in make_loader(dm.test_dataset, 256, shuffle=False):
            out = engine(x)
            n += len(y)
            correct += int((out.pred == y).sum())
            counts += torch.bincount(out.exit, minlength=len(counts))
        rates = [int(c) / n for c in counts]
        now = {"accuracy": correct / n, "exit_rates": rates,
               "avg_cost_fraction": sum(r * c for r, c in zip(rates, engine.costs))}
        before = old["test"]
        same = (round(before["accuracy"] * n) == correct
                and [round(r * n) for r in before["exit_rates"]] == counts.tolist())
        records.append({"file": name, "policy": policy, "thresholds": thresholds,
                        "recorded": {k: before[k] for k in ("accuracy", "exit_rates", "avg_cost_fraction")},
                        "replayed": now, "same_decisions": same,
                        "cost_difference": now["avg_cost_fraction"] - before["avg_cost_fraction"]})
        rows.append([name, policy, f"{100 * before['accuracy']:.2f} / {100 * now['accuracy']:.2f}",
                     " / ".join(f"{100 * r:.2f}" for r in before["exit_rates"]) + " ; "
                     + " / ".join(f"{100 * r:.2f}" for r in rates),
                     f"{before['avg_cost_fraction']:.6f} / {now['avg_cost_fraction']:.6f}",
                     "yes" if same else "NO"])
    table = markdown_table(["file", "policy", f"test acc % ({args.rev} / now)",
                            "exit rates % (then ; now)", "avg cost (then / now)", "same decisions"], rows)
    print(f"MNIST test split, {RUN.name}: thresholds recorded at {args.rev}, replayed through "
          f"today's engine\n\n{table}")
    path = save_report(__file__, {"run": str(RUN), "rev": args.rev, "table": table, "records": records,
                                  "settings": vars(args)},
                       seeds=None, chosen_on={"thresholds": "val"})
    print(f"saved {path}")
    if not all(r["same_decisions"] for r in records):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
