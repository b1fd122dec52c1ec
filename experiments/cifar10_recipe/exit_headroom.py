"""How far a network's trained exits could go at issue 20's cost target, under any exit rule.

Issue 20 asks resnet20 with exits for test accuracy within 1 point of resnet20 without
exits at an average cost fraction of at most 0.45. No threshold chosen on val reached it
(experiments/README.md). This script separates the two reasons it could fail:

- the exits' *decisions* (a confidence threshold that lets the wrong samples go), which a
  better exit rule could mend; or
- the exits' *predictions*: if even an oracle, which knows every sample's label and sends
  it to the cheapest exit that classifies it right, cannot reach the target at that cost,
  no exit rule of any kind can with these trained exits.

The oracle at a cost budget ``B``: each sample pays at least the cheapest exit it can take;
a sample that some allowed exit classifies right may be sent there for the difference. To
be right as often as possible within ``n * B``, send the samples with the smallest
differences first (every sample counts the same, so this greedy choice is optimal). Heads
that no sample leaves through need not run (:meth:`eenet.cost.CostTable.fractions_skipping`),
so the oracle is searched over every subset of early exits used, and the best is kept. It
uses test labels: a bound on every rule, never a result.

Between the two, the threshold rules themselves: per policy (``--policies``, and the run's
own), the most accurate per-exit thresholds that eenet's search
(:class:`eenet.calibration.Calibrator`) finds *on test* at cost <= ``--budget``: what the
best thresholds of that score could give, also chosen on test and so not a result (the
search is not exhaustive, so the best vector may be a little better).

Per run, on test (the static pass over every exit, :func:`eenet.calibration.cache_exit_outputs`,
checked against the run's own results.json up to the samples that float rounding may move
across a tie, :func:`rounding_fragile`) and on val beside it (not checked: see ``measure``): every exit's accuracy and
cost fraction; the oracle's accuracy at cost <= ``--budget``; the oracle's smallest cost at
which it is within ``--points`` of the reference (a finished run without exits, read from
its results.json). Runs are read as data (:func:`eenet.runs.load_run`: config checked,
weights with ``weights_only=True``).

    python experiments/cifar10_recipe/exit_headroom.py experiments/runs/cifar10_recipe/resnet20_sdn_40ep_s0 \
        --reference experiments/runs/cifar10_recipe/resnet20_recipe_40ep_s0 --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import sys
from pathlib import Path

import torch

from eenet.calibration import Calibrator, cache_exit_outputs
from eenet.cost import CostTable
from eenet.errors import EENetError
from eenet.reporting.experiment import save_report
from eenet.reporting.markdown import markdown_table
from eenet.reporting.results import finished_run_results
from eenet.runs import load_run

#: issue 20's cost target and accuracy tolerance (points below the reference)
BUDGET = 0.45
POINTS = 1.0
#: the exit scores whose thresholds are bounded besides the run's own policy
POLICIES = ("max_prob", "entropy", "patience")


def oracle_curve(correct: torch.Tensor, costs: list[float], allowed: list[bool]
                 ) -> tuple[float, torch.Tensor]:
    """The oracle's cheapest way to be right on k samples, for every k.

    Args:
        correct: (n, N+1) bool, exit i classifies sample b right.
        costs: c_0..c_N, the cost fraction of leaving at each exit.
        allowed: which exits the oracle may use (the final exit always).

    Returns:
        ``(base, extra)``: every sample pays ``base`` (the cheapest allowed exit); being
        right on sample b costs ``extra[b]`` more, sorted ascending, ``inf`` where no
        allowed exit is right.
    """
    idx = [i for i, a in enumerate(allowed) if a]
    c = torch.tensor([costs[i] for i in idx], dtype=torch.float64)
    ok = correct[:, idx]
    big = torch.full_like(c, float("inf"))
    # cost of the cheapest allowed exit that is right, per sample (inf if none)
    cheapest_right = torch.where(ok, c.expand_as(ok), big.expand_as(ok)).min(1).values
    base = float(c.min())
    return base, torch.sort(cheapest_right - base).values


def oracle_at(base: float, extra: torch.Tensor, budget: float) -> float:
    """The oracle's accuracy at average cost <= ``budget`` (0 if ``base`` exceeds it)."""
    n = extra.numel()
    room = (budget - base) * n
    if room < 0:
        return 0.0
    spent = torch.cumsum(torch.where(torch.isfinite(extra), extra, torch.zeros_like(extra)), 0)
    # 1e-9 per sample: the float64 rounding of n summed fractions, far below one sample's cost
    fits = torch.isfinite(extra) & (spent <= room + 1e-9 * n)
    return int(fits.sum()) / n


def oracle_cost_for(base: float, extra: torch.Tensor, accuracy: float) -> float | None:
    """The oracle's smallest average cost for at least ``accuracy`` (None if out of reach)."""
    n = extra.numel()
    # samples that must be right; 0.07 * 10000 is 700.0000000000001 in float64: the 1e-9
    # keeps it 700 rather than 701
    k = max(0, math.ceil(accuracy * n - 1e-9))
    if k == 0:
        return base
    if k > n or not torch.isfinite(extra[k - 1]):
        return None
    return base + float(extra[:k].sum()) / n


def best_oracle(correct: torch.Tensor, cost: CostTable, budget: float, accuracy: float) -> dict:
    """The oracle over every subset of early exits used (unused heads skipped)."""
    n_early = len(cost.exits) - 1
    best_acc = best_cost = None
    for used in itertools.product((True, False), repeat=n_early):
        skipped = [not u for u in used]
        if any(s and j in cost.always_run for j, s in enumerate(skipped)):
            continue
        base, extra = oracle_curve(correct, cost.fractions_skipping(skipped), [*used, True])
        acc = oracle_at(base, extra, budget)
        c = oracle_cost_for(base, extra, accuracy)
        if best_acc is None or acc > best_acc[0]:
            best_acc = (acc, [j for j, u in enumerate(used) if u])
        if c is not None and (best_cost is None or c < best_cost[0]):
            best_cost = (c, [j for j, u in enumerate(used) if u])
    return {"accuracy_within_budget": best_acc[0], "exits_used_for_accuracy": best_acc[1],
            "cost_for_accuracy": None if best_cost is None else best_cost[0],
            "exits_used_for_cost": None if best_cost is None else best_cost[1]}


@torch.inference_mode()
def rounding_fragile(net: torch.nn.Module, batches, logits32: list[torch.Tensor]) -> list[int]:
    """Per exit, the samples whose float32 prediction rounding alone could change.

    Another CPU, or another thread count, sums in another order, so a sample whose two best
    logits are nearly tied may be predicted otherwise there. The rounding noise is measured
    here, against the same pass in float64: ``delta``, the largest logit difference at that
    exit; two float32 passes each within ``delta`` of it differ by at most ``2 * delta``, so a
    sample whose top-2 margin is within that may flip. Returns their count per exit.
    """
    ref = copy.deepcopy(net).double().eval()
    exact: list[list[torch.Tensor]] = [[] for _ in logits32]
    for x, _ in batches:
        for i, lg in enumerate(ref(x.double()).logits):
            exact[i].append(lg)
    out = []
    for z32, parts in zip(logits32, exact):
        delta = float((z32.double() - torch.cat(parts)).abs().max())
        top2 = z32.double().topk(2, dim=1).values
        out.append(int((top2[:, 0] - top2[:, 1] <= 2 * delta).sum()))
    return out


def checked_against(run: Path, net: torch.nn.Module, loader, cached, reported: list[dict]
                    ) -> dict:
    """The test split's exits against the run's results.json: the same weights and data as
    eenet-train's test, every exit right on the same number of samples, but for those whose
    prediction rounding may flip (:func:`rounding_fragile`, measured only when needed). A larger
    gap means another checkpoint or other data: refused in one line."""
    n = len(cached)
    acc = cached.correct.double().mean(0).tolist()
    gaps = [abs(round(a * n) - round(r["test_accuracy"] * n)) for a, r in zip(acc, reported)]
    fragile = rounding_fragile(net, loader, cached.logits) if any(gaps) else None
    for i, (a, r, gap) in enumerate(zip(acc, reported, gaps)):
        f = fragile[i] if fragile else 0
        if gap > f:
            raise EENetError(f"{run}: exit {i}'s test accuracy {a:.4f} is not the "
                             f"{r['test_accuracy']:.4f} of its results.json ({gap} samples "
                             f"apart, {f} within rounding of a tie)")
    return {"samples_apart_from_results_json": gaps, "samples_within_rounding_of_a_tie": fragile}


def best_thresholds_within(cached, policy: str, cost: CostTable, budget: float) -> dict:
    """The search's most accurate thresholds of ``policy`` at cost <= ``budget`` on ``cached``."""
    res = Calibrator(cached, policy, cost).calibrate(budget=budget)
    return {"policy": policy, "reachable": res.reachable, "accuracy": res.chosen.accuracy,
            "cost": res.chosen.avg_cost, "thresholds": res.chosen.thresholds}


def measure(run: Path, reference: dict[str, float], budget: float, points: float,
            data_root: str | None, policies: tuple[str, ...] = POLICIES) -> dict:
    """``reference``: the run without exits' final-exit accuracy per split ("val", "test")."""
    reported = finished_run_results(run)["exits"]
    cfg, dm, net, cost = load_run(run, data_root)
    if len(cost.exits) < 2:
        raise EENetError(f"{run} has no early exit: nothing to bound")
    out = {"run": str(run), "epochs": cfg.trainer.max_epochs, "seed": cfg.seed,
           "cost_fractions": cost.fractions, "budget": budget}
    for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        cached = cache_exit_outputs(net, loader)
        # checked on test only: results.json's val figures of runs made before dac6b6f may be
        # of the last weight average rather than model.pt (experiments/README.md, lambda 0.25)
        checked = checked_against(run, net, loader, cached, reported) if split == "test" else {}
        correct = cached.correct
        target = reference[split] - points / 100
        out[split] = {"samples": len(cached), "exit_accuracy": correct.double().mean(0).tolist(),
                      "target_accuracy": target, **checked,
                      "any_exit_right": float(correct.any(1).double().mean()),
                      **best_oracle(correct, cost, budget, target)}
        if split == "test":
            names = dict.fromkeys([*policies, cfg.policy.name])  # the run's own last, once
            out["thresholds_chosen_on_test"] = [best_thresholds_within(cached, p, cost, budget)
                                                for p in names]
    return out


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="finished eenet-train runs with exits")
    p.add_argument("--reference", type=Path, required=True,
                   help="the finished run without exits that the target is measured from")
    p.add_argument("--budget", type=float, default=BUDGET, help="average cost fraction")
    p.add_argument("--points", type=float, default=POINTS, help="points below the reference")
    p.add_argument("--policies", nargs="+", default=list(POLICIES),
                   help="exit scores whose best thresholds on test are bounded (and the run's own)")
    p.add_argument("--data-root", default=None, help="where the data is now, if it moved")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--suffix", default="", help="added to the JSON file's name")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        if not 0 < args.budget or not 0 <= args.points < 100:
            raise EENetError(f"--budget must be > 0 and --points in [0, 100): got "
                             f"{args.budget}, {args.points}")
        final = finished_run_results(args.reference)["exits"][-1]
        reference = {s: final[f"{s}_accuracy"] for s in ("val", "test")}
        rows = [measure(r, reference, args.budget, args.points, args.data_root,
                        tuple(args.policies)) for r in args.runs]
    except EENetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = markdown_table(
        ["run", "exit test % (cost fraction)", "some exit right %",
         f"best thresholds' test % at cost <= {args.budget} (chosen on test)",
         f"oracle test % at cost <= {args.budget}",
         f"oracle cost for >= {100 * (reference['test'] - args.points / 100):.2f} % test"],
        [[Path(r["run"]).name,
          " / ".join(f"{100 * a:.1f} ({c:.2f})"
                     for a, c in zip(r["test"]["exit_accuracy"], r["cost_fractions"])),
          _pct(r["test"]["any_exit_right"]),
          ", ".join(f"{t['policy']} {_pct(t['accuracy']) if t['reachable'] else '-'}"
                    for t in r["thresholds_chosen_on_test"]),
          _pct(r["test"]["accuracy_within_budget"]),
          "-" if r["test"]["cost_for_accuracy"] is None else f"{r['test']['cost_for_accuracy']:.3f}"]
         for r in rows])
    print(f"reference {args.reference.name}: {100 * reference['test']:.2f} % test; the oracle knows "
          f"the labels, so its figures bound every exit rule and are not results")
    print(text)
    out = save_report(__file__, {"reference": {"run": str(args.reference),
                                               **{f"{s}_accuracy": a for s, a in reference.items()}},
                                 "runs": rows, "markdown": text}, args.suffix,
                      seeds=sorted({r["seed"] for r in rows}),
                      chosen_on={"oracle": "test"})  # it sees the labels: a bound
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
