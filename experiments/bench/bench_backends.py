"""Engine backends side by side on the MNIST test set: eager, compiled (traced + frozen), onnxruntime.

Issue 19's acceptance benchmark. The ``mnist_budget`` resnet20 with 2 exits
(``experiments/runs/mnist_budget/ee``) and the plain resnet20 trained by the same recipe
(``.../plain``), every backend in ONE run, ``--threads`` threads (2), median of ``--reps``
(5) timed passes over the test set, the plain network and the early-exit engine alternating
pass by pass so that both see the same load.

Thresholds: calibrated here on val (MACs as the cost, as ``experiments/mnist_budget/run.py``
does) for the tolerance that run used, 0.3 accuracy points below the model's own final exit;
the policy is chosen on val as that run chooses it: of confidence, max_prob, entropy and
patience, the one with the lowest val cost that meets the tolerance (``--policy`` forces one).
The same thresholds run on every backend.

Per backend:

- time per image at batch 1 and at batch 256 of the plain resnet20 and of the engine, and
  the speed-up plain / engine on the same backend; at batch 256 also of the engine's
  streaming mode (``DynamicEngine.stream`` over the same batches, its defaults: pools of at
  least 256 samples, or 16 batches old), timed in the same alternation;
- the latency ceiling, t_plain / sum_i rate_i x t_i (t_i: the backend's measured time per
  sample to leave at exit i at that batch size, :func:`eenet.inference.latency_cost_table`,
  idle heads left out; rate_i: the test exit rates), the speed-up a perfect engine would
  reach, and the share of it the engine realises (speed-up / ceiling), for streaming too
  (the same ceiling as the batch-256 row);
- the arithmetic throughput to each exit at batch 256 (MACs to exit i / t_i; fvcore MACs,
  one fused multiply-add = one MAC) against the plain network's at batch 256 in this run;
- predictions and exits on the whole test set at batch 256 and at batch 1 against eager's,
  and those of streaming against the same engine batch by batch (mismatch counts: a pooled
  batch rounds differently, so a score within rounding of its threshold may flip);
- build and first-call times, per-sample latency at batch 1 (p50/p95/p99/max/mean) of the
  engine and of the plain run, interleaved;
- the latency budget: ``budget_ms`` = half the plain network's batch-1 time per image on
  this backend; thresholds calibrated on val with the backend's batch-1 latency table as
  the cost (the same policy); on test the measured mean per-sample time against the
  calibrated expectation (within 10 %?), the p95 (expected and measured) and the accuracy.

The CPU model, thread count and load averages are recorded with the figures; results go
through :func:`eenet.reporting.experiment.save_report` into ``bench_backends.json``
(``bench_backends_quick.json`` with ``--quick``: 200 test samples, one rep, fewer repeats
in the latency tables; a check that the script runs, not a measurement).

    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 \\
        python experiments/bench/bench_backends.py            # on an idle machine
    python experiments/bench/bench_backends.py --quick --threads 1
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import time
from pathlib import Path

import torch

from eenet.calibration import Calibrator, cache_exit_outputs
from eenet.data.batching import make_loader
from eenet.inference import BACKENDS, DynamicEngine, create_engine, latency_cost_table
from eenet.inference.latency import tail_latencies, tail_latency
from eenet.policies import POLICIES, create_policy
from eenet.reporting.experiment import machine_info, save_report
from eenet.reporting.markdown import markdown_table
from eenet.runs import load_run

RUNS = Path(__file__).resolve().parent.parent / "runs" / "mnist_budget"
TOLERANCE = 0.3  # accuracy points: experiments/mnist_budget/run.py's target


def per_image_ms(fn, batches: list[torch.Tensor]) -> float:
    """Milliseconds per image of one pass of ``fn`` over ``batches``."""
    n = sum(x.shape[0] for x in batches)
    t0 = time.perf_counter()
    for x in batches:
        fn(x)
    return 1e3 * (time.perf_counter() - t0) / n


def stream_ms(engine, batches: list[torch.Tensor]) -> float:
    """Milliseconds per image of one pass of ``engine.stream`` over ``batches``."""
    n = sum(x.shape[0] for x in batches)
    t0 = time.perf_counter()
    for _ in engine.stream(batches):
        pass
    return 1e3 * (time.perf_counter() - t0) / n


def alternate(passes, batches, reps: int) -> list[list[float]]:
    """``reps`` timed passes of each of ``passes`` (callables over the list of batches giving
    milliseconds per image), the order rotating by one each repetition (two: alternating
    which goes first), after one untimed warm-up pass of each over the first batches."""
    with torch.inference_mode():
        for one in passes:
            one(batches[:3])
        out = [[] for _ in passes]
        for r in range(reps):
            for k in range(len(passes)):
                i = (k + r) % len(passes)
                out[i].append(passes[i](batches))
    return out


def outputs(engine, batches) -> tuple[torch.Tensor, torch.Tensor]:
    outs = [engine(x) for x in batches]
    return torch.cat([o.exit for o in outs]), torch.cat([o.pred for o in outs])


def stream_outputs(engine, batches) -> tuple[torch.Tensor, torch.Tensor]:
    outs = list(engine.stream(batches))
    assert [o.exit.shape[0] for o in outs] == [x.shape[0] for x in batches]
    return torch.cat([o.exit for o in outs]), torch.cat([o.pred for o in outs])


def choose_policy(val, cost, forced: str | None) -> tuple[str, list, dict]:
    """The policy with the lowest val cost meeting the tolerance (or ``forced``), its
    thresholds, and every policy's val figures."""
    found = {}
    for name in ([forced] if forced else POLICIES):
        res = Calibrator(val, name, cost).calibrate(tolerance=TOLERANCE)
        found[name] = {"reachable": res.reachable, "val_accuracy": res.chosen.accuracy,
                       "val_avg_cost": res.chosen.avg_cost, "thresholds": res.chosen.thresholds,
                       "val_exit_rates": res.chosen.exit_rates,
                       "val_final_exit_accuracy": res.reference.accuracy}
    ok = [n for n in found if found[n]["reachable"]] or list(found)
    name = min(ok, key=lambda n: found[n]["val_avg_cost"])
    return name, found[name]["thresholds"], found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=str(RUNS), help="folder holding the ee and plain runs")
    p.add_argument("--data-root", default=None, help="where MNIST is, if it moved")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--samples", type=int, default=None, help="first n test samples (all)")
    p.add_argument("--policy", choices=POLICIES, default=None,
                   help="force a policy (default: chosen on val)")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--cache", default="/tmp/eenet_bench_backends", help="engine cache folder")
    p.add_argument("--tag", default="", help="appended to the JSON's name (a run on fewer "
                   "samples, say, beside the committed full one)")
    p.add_argument("--quick", action="store_true",
                   help="200 samples, 1 rep, short latency tables: a check that it runs")
    args = p.parse_args()
    if args.quick:
        args.samples, args.reps = args.samples or 200, 1
    if "eager" not in args.backends:
        args.backends.insert(0, "eager")  # the reference of every comparison
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    runs = Path(args.runs)
    _, dm, net, cost = load_run(runs / "ee", args.data_root)
    _, _, plain_net, plain_cost = load_run(runs / "plain", args.data_root)
    size = tuple(dm.input_size)

    # thresholds on val (MACs), as experiments/mnist_budget/run.py chooses them
    val = cache_exit_outputs(net, make_loader(dm.val_dataset, 256, shuffle=False))
    name, thresholds, candidates = choose_policy(val, cost, args.policy)
    policy = create_policy(name, thresholds)
    n = args.samples or len(dm.test_dataset)
    xs = torch.stack([dm.test_dataset[i][0] for i in range(n)])
    ys = torch.tensor([int(dm.test_dataset[i][1]) for i in range(n)])
    sets = {1: list(xs.split(1)), 256: list(xs.split(256))}
    repeats = {1: 10 if args.quick else 100, 256: 3 if args.quick else 20}
    print(f"policy {name} (chosen on val for a tolerance of {TOLERANCE} points), thresholds "
          f"{thresholds}; {n} test samples, {args.threads} thread(s), median of {args.reps}",
          flush=True)

    results, ref = {}, {}
    for backend in args.backends:
        cache = Path(args.cache) / backend
        threads = args.threads
        eng = create_engine(net, policy, cost, backend=backend, cache_dir=cache / "ee",
                            threads=threads)
        plain = create_engine(plain_net, create_policy("max_prob", []), plain_cost,
                              backend=backend, cache_dir=cache / "plain", threads=threads)
        r = {"build_seconds": {"ee": eng.build_seconds, "plain": plain.build_seconds}}
        with torch.inference_mode():
            eng(sets[256][0])
            plain(sets[256][0])
        r["first_call_seconds"] = {"ee": eng.first_call_seconds,
                                   "plain": plain.first_call_seconds}
        # exits and predictions on the whole set, at both batch sizes, against eager's
        same, got = {}, {}
        for bs, batches in sets.items():
            e, pr = got[bs] = outputs(eng, batches)
            if backend == "eager":
                ref[bs] = (e, pr)
            same[f"batch{bs}"] = {"exits_equal": bool(torch.equal(e, ref[bs][0])),
                                  "preds_equal": bool(torch.equal(pr, ref[bs][1])),
                                  "exit_mismatches": int((e != ref[bs][0]).sum()),
                                  "pred_mismatches": int((pr != ref[bs][1]).sum())}
        r["equal_to_eager"] = same
        se, sp = stream_outputs(eng, sets[256])
        e, pr = got[256]
        r["stream_vs_per_batch"] = {"exit_mismatches": int((se != e).sum()),
                                    "pred_mismatches": int((sp != pr).sum())}
        exit_idx, pred = got[256]
        rates = (torch.bincount(exit_idx, minlength=net.num_exits).double() / n).tolist()
        r["accuracy"] = float((pred == ys).double().mean())
        r["plain_accuracy"] = float((outputs(plain, sets[256])[1] == ys).double().mean())
        r["exit_rates"] = rates
        # the engine's own build, so the tables time the calls it makes (onnxruntime's
        # single-sample walk included)
        probe = eng.with_policy(create_policy(name, [float("inf")] * (net.num_exits - 1)), cost)
        tables = {}
        for bs, batches in sets.items():
            passes = [lambda b, f=plain: per_image_ms(f, b), lambda b, f=eng: per_image_ms(f, b)]
            if bs == 256:
                passes.append(lambda b, f=eng: stream_ms(f, b))
            t_plain, t_ee, *t_stream = alternate(passes, batches, args.reps)
            table = latency_cost_table(probe, size, batch_size=bs, repeats=repeats[bs],
                                       min_seconds=0.1 if args.quick else 1.0)
            tables[bs] = table
            expected = table.expected_ms(rates, eng.skipped)
            mp, me = statistics.median(t_plain), statistics.median(t_ee)
            ceiling = mp / expected
            row = {"plain_ms_per_image": mp, "ee_ms_per_image": me, "speedup": mp / me,
                   "latency_table": table.to_dict(), "expected_ms_per_image": expected,
                   "latency_ceiling": ceiling, "share_of_ceiling": (mp / me) / ceiling,
                   "plain_runs": t_plain, "ee_runs": t_ee}
            if bs == 256:  # streaming; achieved arithmetic throughput, MACs per second
                ms = statistics.median(t_stream[0])
                row.update({"ee_stream_ms_per_image": ms, "stream_speedup": mp / ms,
                            "stream_share_of_ceiling": (mp / ms) / ceiling,
                            "ee_stream_runs": t_stream[0]})
                plain_rate = plain_cost.backbone_macs / (mp / 1e3)
                row["plain_macs_per_s"] = plain_rate
                row["exit_macs_per_s"] = [e.macs / (m / 1e3) for e, m in zip(cost.exits, table.ms)]
                row["exit_throughput_vs_plain"] = [v / plain_rate for v in row["exit_macs_per_s"]]
            r[f"batch{bs}"] = row
        tails = tail_latencies({"ee": eng, "plain": plain}, sets[1])
        r["tail_batch1"] = tails
        # the latency budget: half the plain network's batch-1 time on this backend
        budget_ms = r["batch1"]["plain_ms_per_image"] / 2
        res = Calibrator(val, name, tables[1]).calibrate(budget_ms=budget_ms)
        bpol = create_policy(name, res.chosen.thresholds)
        beng = eng.with_policy(bpol, cost)
        btail = tail_latency(beng, sets[1])
        bexit, bpred = outputs(beng, sets[256])
        brates = (torch.bincount(bexit, minlength=net.num_exits).double() / n).tolist()
        expected = res.target["expected_ms"]
        r["budget"] = {"budget_ms": budget_ms, "reachable": res.reachable,
                       "thresholds": res.chosen.thresholds, "val_accuracy": res.chosen.accuracy,
                       "expected_mean_ms_val": expected,
                       "expected_mean_ms_test_rates": tables[1].expected_ms(brates, beng.skipped),
                       "expected_p95_ms_val": tables[1].expected_percentile_ms(
                           res.chosen.exit_rates, 95, beng.skipped),
                       "measured_mean_ms": btail["mean_ms"], "measured_p95_ms": btail["p95_ms"],
                       "measured_over_expected": btail["mean_ms"] / expected,
                       "within_10pct": abs(btail["mean_ms"] / expected - 1) <= 0.1,
                       "test_accuracy": float((bpred == ys).double().mean()),
                       "test_exit_rates": brates, "tail": btail}
        results[backend] = r
        print(f"{backend}: batch 1 {r['batch1']['ee_ms_per_image']:.4f} ms/img "
              f"(plain {r['batch1']['plain_ms_per_image']:.4f}), batch 256 "
              f"{r['batch256']['ee_ms_per_image']:.4f} (plain "
              f"{r['batch256']['plain_ms_per_image']:.4f}), share of ceiling at 256 "
              f"{r['batch256']['share_of_ceiling']:.3f}, streaming "
              f"{r['batch256']['ee_stream_ms_per_image']:.4f} (share "
              f"{r['batch256']['stream_share_of_ceiling']:.3f})", flush=True)

    e1 = results["eager"]["batch1"]["ee_ms_per_image"]
    rows = []
    for backend, r in results.items():
        r["batch1_speedup_over_eager"] = e1 / r["batch1"]["ee_ms_per_image"]
        b = r["budget"]
        eq = all(v["exits_equal"] and v["preds_equal"] for v in r["equal_to_eager"].values())
        sv = r["stream_vs_per_batch"]
        flips = sv["exit_mismatches"] + sv["pred_mismatches"]
        rows.append([backend, f"{r['batch1']['ee_ms_per_image']:.4f}",
                     f"{r['batch1_speedup_over_eager']:.2f}", f"{r['batch1']['speedup']:.2f}",
                     f"{r['batch1']['share_of_ceiling']:.3f}",
                     f"{r['batch256']['ee_ms_per_image']:.4f}", f"{r['batch256']['speedup']:.2f}",
                     f"{r['batch256']['share_of_ceiling']:.3f}",
                     f"{r['batch256']['stream_share_of_ceiling']:.3f}"
                     + (f" ({flips} mismatches)" if flips else ""),
                     f"{r['tail_batch1']['ee']['p95_ms']:.4f}", "yes" if eq else "NO",
                     f"{b['budget_ms']:.4f}", f"{b['expected_mean_ms_val']:.4f}",
                     f"{b['measured_mean_ms']:.4f}", f"{b['measured_over_expected']:.3f}",
                     f"{b['measured_p95_ms']:.4f}", f"{100 * b['test_accuracy']:.2f}"])
    table = markdown_table(["backend", "b1 ms/img", "b1 vs eager", "b1 vs plain",
                            "b1 share of ceiling", "b256 ms/img", "b256 vs plain",
                            "b256 share of ceiling", "b256 stream share of ceiling",
                            "b1 p95 ms", "= eager",
                            "budget ms", "expected ms (val)", "measured ms", "measured/expected",
                            "budget p95 ms", "budget acc %"], rows)
    machine = machine_info()
    load = {"before": load_before, "after": os.getloadavg()}
    print(f"\n{machine['cpu']}, {args.threads} thread(s), load average before {load_before}, "
          f"after {load['after']}; policy {name}, {n} test samples, median of {args.reps}"
          f"{' (--quick: not a measurement)' if args.quick else ''}\n\n{table}")
    path = save_report(__file__, {
        "policy": {"name": name, "thresholds": thresholds, "tolerance_points": TOLERANCE,
                   "candidates_on_val": candidates},
        "test_samples": n, "threads": args.threads, "load_average": load,
        "results": results, "table": table, "settings": vars(args),
        "stream": {"min_batch": "the first batch's size (256)",
                   "max_wait": inspect.signature(DynamicEngine.stream).parameters[
                       "max_wait"].default, "note": (
            "BackendEngine.stream with DynamicEngine.stream's defaults; with onnxruntime "
            "PyTorch runs on one thread during each piece of work between two yields, as in "
            "the per-batch engine")}},
        suffix="_quick" if args.quick else args.tag,
        chosen_on={"policy": "val", "thresholds": "val", "budget_thresholds": "val"})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
