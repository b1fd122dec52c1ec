"""Does the certified risk hold? Learn then Test, UCB and CRC against the uncorrected search, resampled.

For each trained run (``--runs``), every exit's outputs on the validation and
test splits are cached once (one static pass; the run is not retrained) and
pooled into a population of N samples. Each repeat draws a calibration set of
n samples **with replacement** from the population (so it is i.i.d. from it),
chooses thresholds by each method for each alpha, and measures the chosen
thresholds' risk, average cost fraction and accuracy on the whole population:

- ``ltt``, ``ucb``, ``crc``: :func:`eenet.calibration.certify_with` (delta for
  ltt and ucb; crc controls the expected risk);
- ``empirical``: the uncorrected search for the same risk <= alpha on the
  calibration set (``Calibrator.calibrate``);
- ``optimism``: the same with its 5-fold optimism correction;
- ``tolerance`` (risk ``drop`` only): today's ``eenet-eval tolerance=100*alpha``,
  the accuracy drop against the final exit at most alpha on the calibration set.

The last two are the slow ones (K + 1 searches, and one search); with
``--optimism-repeats R`` they run on the first R repeats only (the JSON records
each method's number of repeats).

Reported per run, alpha and method: the violation frequency (population risk >
alpha) with its binomial standard error sqrt(f (1 - f) / R), the mean
population risk, the mean average cost, the mean accuracy drop against the
final exit (points) and how often an early-exiting point was certified. Targets
(issue 18): ltt and ucb violate in at most delta + 2 SE_delta of the repeats
(SE_delta = sqrt(delta (1 - delta) / R), the standard error if the true
frequency were delta); crc's mean risk is at most alpha; the certified point's
mean cost within 25 % of the uncorrected search's at n = 5,000 on MNIST, alpha =
1 point.

The cached outputs go to ``runs/cache/`` and the per-repeat records to
``runs/partial_*.json`` beside this script (both git-ignored); a run that is
stopped continues where it stopped (``--resume``). One torch thread.

    python experiments/guarantee/run.py --repeats 20 --out _estimate    # timing estimate
    nohup python experiments/guarantee/run.py --resume > runs/log.txt &  # the full run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import torch

from eenet.calibration import CachedExits, Calibrator, cache_exit_outputs
from eenet.calibration.guarantee import certify_with, empirical_search
from eenet.calibration.risk import exit_losses, risk_view
from eenet.cost import CostTable
from eenet.io import atomic_write, atomic_write_text, safe_torch_load
from eenet.reporting.experiment import git_revision, save_report
from eenet.reporting.markdown import markdown_table

HERE = Path(__file__).resolve().parent
RUNS = HERE.parent / "runs"
WORK = HERE / "runs"  # git-ignored (experiments/**/runs/)
CERTIFIED = ("ltt", "ucb", "crc")
METHODS = (*CERTIFIED, "empirical", "optimism", "tolerance")


def population(run_dir: Path) -> tuple[CachedExits, CostTable, dict]:
    """Val and test outputs of a finished run, pooled (cached in runs/cache/)."""
    run_dir = run_dir.resolve()
    model = run_dir / "model.pt"
    key = hashlib.sha256(f"{run_dir}:{model.stat().st_mtime_ns}".encode()).hexdigest()[:12]
    path = WORK / "cache" / f"{run_dir.name}_{key}.pt"
    if path.is_file():
        d = safe_torch_load(path, what="cached exit outputs")
    else:
        from eenet.data.batching import make_loader
        from eenet.runs import load_run

        t0 = time.time()
        _, dm, net, cost = load_run(run_dir)
        parts = [cache_exit_outputs(net, make_loader(ds, 512, shuffle=False))
                 for ds in (dm.val_dataset, dm.test_dataset)]
        d = {"logits": [torch.cat([p.logits[i] for p in parts]) for i in range(len(parts[0].logits))],
             "conf_logits": [torch.cat([p.conf_logits[i] for p in parts])
                             for i in range(len(parts[0].conf_logits))],
             "targets": torch.cat([p.targets for p in parts]),
             "n_val": len(parts[0]), "n_test": len(parts[1]), "cost": json.dumps(cost.to_dict())}
        atomic_write(path, lambda f: torch.save(d, f))
        print(f"cached {run_dir} in {time.time() - t0:.0f} s -> {path}", flush=True)
    cached = CachedExits(d["logits"], d["conf_logits"], d["targets"])
    info = {"run": str(run_dir), "cache": str(path), "n_val": d["n_val"], "n_test": d["n_test"],
            "N": len(cached)}
    return cached, CostTable.from_dict(json.loads(d["cost"])), info


def one_repeat(pop: Calibrator, losses: torch.Tensor, idx: torch.Tensor, r: int, args,
               slow: bool) -> dict:
    """Every method at every alpha on the calibration sample ``idx``: chosen score thresholds
    and calibration seconds (``optimism`` and ``tolerance`` only when ``slow``)."""
    sub, sub_losses = pop.subset(idx), losses[idx]
    out = {}
    for alpha in args.alphas:
        rows = {}
        for m in METHODS:
            if (m in ("optimism", "tolerance") and not slow) or (m == "tolerance" and args.risk != "drop"):
                continue
            t0 = time.perf_counter()
            if m in CERTIFIED:
                res = certify_with(sub, sub_losses, args.risk, m, alpha, args.delta,
                                   order_fraction=args.order_fraction, seed=r, baselines=False)
                vec, early = res.score_thresholds, res.early_exit_certified
            elif m == "tolerance":
                chosen = sub.calibrate(tolerance=100 * alpha).chosen
                vec, early = sub.score_vector(chosen.thresholds).tolist(), None
            else:
                res = empirical_search(sub, sub_losses, alpha, 5 if m == "optimism" else 0, seed=r)
                vec, early = res["score_thresholds"] if res["reachable"] else ["inf"] * pop.n, None
            rows[m] = {"t": [float(t) for t in vec], "early": early, "s": time.perf_counter() - t0}
        out[str(alpha)] = rows
    return out


def measure(pop: Calibrator, view: Calibrator, final_acc: float, rec: dict) -> None:
    """Add the population risk, cost and accuracy drop of every chosen vector of a repeat."""
    keys = [(a, m) for a, rows in rec.items() for m in rows]
    vecs = torch.tensor([rec[a][m]["t"] for a, m in keys], dtype=pop.scores.dtype)
    acc, cost, _ = pop.evaluate(vecs)
    ok, _, _ = view.evaluate(vecs)
    for k, (a, m) in enumerate(keys):
        rec[a][m].update(risk=1 - float(ok[k]), cost=float(cost[k]),
                         drop=100 * (final_acc - float(acc[k])))


def summarize(records: list[dict], alphas, delta: float) -> dict:
    out = {}
    for alpha in alphas:
        per = {}
        for m in METHODS:
            rows = [r[str(alpha)][m] for r in records if m in r[str(alpha)]]
            if not rows:
                continue
            k = len(rows)
            viol = sum(x["risk"] > alpha for x in rows) / k
            early = [x["early"] for x in rows if x["early"] is not None]
            per[m] = {"repeats": k, "violation_freq": viol, "violation_se": math.sqrt(viol * (1 - viol) / k),
                      "mean_risk": sum(x["risk"] for x in rows) / k,
                      "mean_cost": sum(x["cost"] for x in rows) / k,
                      "mean_acc_drop_points": sum(x["drop"] for x in rows) / k,
                      "early_certified_freq": sum(early) / len(early) if early else None,
                      "mean_calibration_s": sum(x["s"] for x in rows) / k}
        se_delta = math.sqrt(delta * (1 - delta) / max(1, len(records)))
        checks = {}
        for m in ("ltt", "ucb"):
            if m in per:
                checks[f"{m}_violation_le_delta_plus_2se"] = per[m]["violation_freq"] <= delta + 2 * se_delta
        if "crc" in per:
            checks["crc_mean_risk_le_alpha"] = per["crc"]["mean_risk"] <= alpha
        for m in CERTIFIED:
            for base in ("empirical", "tolerance"):
                if m in per and base in per and per[base]["mean_cost"] > 0:
                    checks[f"{m}_cost_over_{base}"] = per[m]["mean_cost"] / per[base]["mean_cost"]
        out[str(alpha)] = {"methods": per, "se_delta": se_delta, "checks": checks}
    return out


def run_model(run_dir: Path, args) -> dict:
    cached, cost, info = population(run_dir)
    pop = Calibrator(cached, args.policy, cost)
    losses = exit_losses(cached, args.risk)
    view = risk_view(pop, losses)
    final_acc = float(cached.correct[:, -1].double().mean())
    n = args.n or min(5000, info["N"])
    settings = {"run": info["run"], "policy": args.policy, "risk": args.risk, "alphas": args.alphas,
                "delta": args.delta, "n": n, "order_fraction": args.order_fraction, "seed": args.seed}
    tag = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    partial = WORK / f"partial_{run_dir.name}_{tag}.json"
    records: list[dict] = []
    if args.resume and partial.is_file():
        records = json.loads(partial.read_text())["records"]
        print(f"{run_dir.name}: resuming after {len(records)} repeats ({partial})", flush=True)
    t_start = time.time()
    for r in range(len(records), args.repeats):
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + r)  # repeat r's sample
        idx = torch.randint(0, info["N"], (n,), generator=g)
        rec = one_repeat(pop, losses, idx, r, args, r < args.optimism_repeats)
        measure(pop, view, final_acc, rec)
        records.append(rec)
        if (r + 1) % 10 == 0 or r + 1 == args.repeats:
            atomic_write_text(partial, json.dumps({"settings": settings, "records": records}))
            print(f"{run_dir.name}: {r + 1}/{args.repeats} repeats, {time.time() - t_start:.0f} s "
                  f"this session", flush=True)
    return {**info, "final_exit_accuracy_population": final_acc, "n": n, "partial": str(partial),
            "repeats": len(records), "optimism_repeats": min(args.optimism_repeats, len(records)),
            "results": summarize(records, args.alphas, args.delta)}


def table(models: dict) -> str:
    rows = []
    for name, mres in models.items():
        for alpha, res in mres["results"].items():
            for m, s in res["methods"].items():
                rows.append([name, f"{100 * float(alpha):g}", m, s["repeats"],
                             f"{s['violation_freq']:.3f} +- {s['violation_se']:.3f}",
                             f"{100 * s['mean_risk']:.3f}", f"{s['mean_cost']:.4f}",
                             f"{s['mean_acc_drop_points']:+.3f}",
                             "" if s["early_certified_freq"] is None else f"{s['early_certified_freq']:.2f}",
                             f"{s['mean_calibration_s']:.2f}"])
    return markdown_table(["model", "alpha (points)", "method", "repeats", "violation freq +- SE",
                           "mean risk (points)", "mean cost", "mean acc drop (points)",
                           "early exit certified", "calibration s"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", type=Path,
                   default=[RUNS / "mnist_budget" / "ee", RUNS / "cifar10_sdn_15ep"])
    p.add_argument("--policy", default="max_prob")
    p.add_argument("--risk", default="drop")
    p.add_argument("--alphas", nargs="+", type=float, default=[0.005, 0.01, 0.02])
    p.add_argument("--delta", type=float, default=0.1)
    p.add_argument("--n", type=int, default=0, help="calibration samples (default min(5000, N))")
    p.add_argument("--repeats", type=int, default=1000)
    p.add_argument("--optimism-repeats", type=int, default=None,
                   help="repeats that also run the optimism-corrected search and today's tolerance "
                        "search, the slow ones (default: all)")
    p.add_argument("--order-fraction", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--out", default="", help="suffix of the JSON beside this script")
    args = p.parse_args()
    if args.optimism_repeats is None:
        args.optimism_repeats = args.repeats
    torch.set_num_threads(1)
    started = git_revision(__file__)
    models = {}
    for run_dir in args.runs:
        models[run_dir.name] = run_model(run_dir, args)
    text = table(models)
    print(text)
    path = save_report(str(HERE / "results.json"), {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "thresholds_chosen_on": "each repeat's calibration sample (n drawn with replacement from "
                                "the pooled val + test population); measured on the whole population",
        "models": models, "table": text}, suffix=args.out, revision=started,
        seeds={"sample": f"torch.Generator().manual_seed(seed * 1000003 + r), r = 0..repeats-1, seed "
                         f"{args.seed}", "split": "certify_with(seed=r)", "optimism": "seed=r"},
        chosen_on=None)  # thresholds: on each repeat's sample of the pooled val + test population
    print(f"saved {path}")


if __name__ == "__main__":
    main()
