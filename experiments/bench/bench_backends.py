"""Engine backends side by side on the MNIST test set: eager, compiled (traced + frozen), onnxruntime.

The mnist_budget resnet20 with exits and its thresholds (``eval_budget/results.json``, read with
``read_policy``; a file in an older threshold format is recalibrated here on val for its recorded
target, and the JSON says so), against the plain resnet20 run by the same backend. 2 threads,
median of ``--reps``. Per backend: time per image at batch 1 and 256, speed-up over plain, the
share of the latency ceiling (t_plain / sum_i rate_i x time to exit i, from the backend's own
latency table), exits and predictions equal to eager's, build and first-call times, tail latency
at batch 1; then a ``budget_ms`` run (half the plain network's batch-1 time per image on the same
backend): expected time (calibrated on val) against the measured mean on test, accuracy, p95.
The load average and CPU model are recorded with the figures.

    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 \\
        python experiments/bench/bench_backends.py [--samples 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from eenet.calibration import Calibrator, cache_exit_outputs
from eenet.errors import EENetError
from eenet.inference import create_engine, latency_cost_table, tail_latency
from eenet.policies import create_policy
from eenet.reporting.experiment import save_report
from eenet.reporting.markdown import markdown_table
from eenet.reporting.results import read_policy
from eenet.runs import load_run

RUNS = Path(__file__).resolve().parent.parent / "runs" / "mnist_budget"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def per_image(fn, batches, reps) -> list[float]:
    n = sum(x.shape[0] for x in batches)
    out = []
    with torch.inference_mode():
        for x in batches[:2]:
            fn(x)
        for _ in range(reps):
            t0 = time.perf_counter()
            for x in batches:
                fn(x)
            out.append(1e3 * (time.perf_counter() - t0) / n)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--samples", type=int, default=None, help="first n test samples (default all)")
    p.add_argument("--cache", default="/tmp/eenet_bench_backends", help="engine cache folder")
    args = p.parse_args()
    torch.set_num_threads(2)
    load = os.getloadavg()
    _, dm, net, cost = load_run(RUNS / "ee")
    _, pdm, plain_net, plain_cost = load_run(RUNS / "plain")
    eval_path = RUNS / "ee" / "eval_budget" / "results.json"
    ev = json.loads(eval_path.read_text())
    val = cache_exit_outputs(net, dm.val_dataloader())
    try:
        policy, recalibrated = create_policy(*read_policy(ev, str(eval_path))), None
    except EENetError as exc:  # an older file: recalibrate on val for the recorded target
        cal = Calibrator(val, ev["policy"]["name"], cost)
        tgt = ev["target"]
        kw = {"tolerance": tgt["value"]} if tgt["kind"] == "tolerance" else {"budget": tgt["value"]}
        policy = create_policy(cal.policy.name, cal.calibrate(**kw).chosen.thresholds)
        recalibrated = {"reason": str(exc), "target": tgt, "thresholds": policy.thresholds}
    xs = torch.stack([dm.test_dataset[i][0] for i in range(args.samples or len(dm.test_dataset))])
    ys = torch.tensor([int(dm.test_dataset[i][1]) for i in range(xs.shape[0])])
    size = tuple(xs.shape[1:])
    results, rows, ref = {}, [], None
    for backend in ("eager", "compiled", "onnxruntime"):
        cache = Path(args.cache) / backend
        eng = create_engine(net, policy, cost, backend=backend, cache_dir=cache / "ee", threads=2)
        # the plain resnet20 as a network with no early exit, run by the same backend
        plain = create_engine(plain_net, create_policy("max_prob", [] if plain_net.num_exits == 1
                                                        else None), plain_cost, backend=backend,
                              cache_dir=cache / "plain", threads=2)
        r = {"build_seconds": eng.build_seconds}
        out = eng(xs)
        r["first_call_seconds"] = eng.first_call_seconds
        if ref is None:
            ref = out
        r["equal_to_eager"] = {"exits": bool(torch.equal(out.exit, ref.exit)),
                               "preds": bool(torch.equal(out.pred, ref.pred))}
        rates = (torch.bincount(out.exit, minlength=net.num_exits).double() / len(xs)).tolist()
        r["accuracy"] = float((out.pred == ys).double().mean())
        r["exit_rates"] = rates
        for bs in (1, 256):
            batches = list(xs.split(bs)) if bs > 1 else list(xs[:1000].split(1))
            t_plain, t_ee = [], []
            for _ in range(args.reps):  # alternate, so both see the same load
                t_plain += per_image(plain, batches, 1)
                t_ee += per_image(eng, batches, 1)
            table = latency_cost_table(eng, size, batch_size=bs, repeats=20 if bs == 1 else 5)
            expected = table.expected_ms(rates)
            mp, me = statistics.median(t_plain), statistics.median(t_ee)
            ceiling = mp / expected
            r[f"batch{bs}"] = {"plain_ms_per_image": mp, "ee_ms_per_image": me, "speedup": mp / me,
                               "latency_table": table.to_dict(), "latency_ceiling": ceiling,
                               "share_of_ceiling": (mp / me) / ceiling, "plain_runs": t_plain,
                               "ee_runs": t_ee}
        r["tail"] = tail_latency(eng, xs[:2000])
        # budget_ms: half the plain network's batch-1 time on this backend
        table1 = latency_cost_table(eng, size, batch_size=1, repeats=20)
        budget_ms = r["batch1"]["plain_ms_per_image"] / 2
        cal = Calibrator(val, policy.name, table1)
        res = cal.calibrate(budget_ms=budget_ms)
        beng = create_engine(net, create_policy(policy.name, res.chosen.thresholds), cost,
                             backend=backend, cache_dir=cache / "ee", threads=2)
        tail = tail_latency(beng, xs[:2000])
        bout = beng(xs)
        r["budget_ms"] = {"budget_ms": budget_ms, "expected_ms_val": res.target["expected_ms"],
                          "measured_mean_ms": tail["mean_ms"], "measured_p95_ms": tail["p95_ms"],
                          "within_10pct": abs(tail["mean_ms"] / res.target["expected_ms"] - 1) <= 0.1,
                          "test_accuracy": float((bout.pred == ys).double().mean()),
                          "thresholds": res.chosen.thresholds, "reachable": res.reachable}
        results[backend] = r
        rows.append([backend, f"{r['batch1']['ee_ms_per_image']:.3f}", f"{r['batch1']['speedup']:.2f}",
                     f"{r['batch256']['ee_ms_per_image']:.4f}", f"{r['batch256']['speedup']:.2f}",
                     f"{r['batch256']['share_of_ceiling']:.2f}", f"{r['tail']['p95_ms']:.3f}",
                     str(all(r["equal_to_eager"].values())), f"{budget_ms:.3f}",
                     f"{r['budget_ms']['expected_ms_val']:.3f}", f"{r['budget_ms']['measured_mean_ms']:.3f}",
                     f"{100 * r['budget_ms']['test_accuracy']:.2f}"])
        print(rows[-1], flush=True)
    e1 = results["eager"]["batch1"]["ee_ms_per_image"]
    for b, r in results.items():
        r["batch1_speedup_over_eager"] = e1 / r["batch1"]["ee_ms_per_image"]
    table = markdown_table(["backend", "b1 ms/img", "b1 vs plain", "b256 ms/img", "b256 vs plain",
                            "b256 share of ceiling", "p95 ms", "= eager", "budget ms", "expected ms",
                            "measured ms", "acc %"], rows)
    machine = {"cpu": cpu_model(), "load_average_before": load, "load_average_after": os.getloadavg(),
               "threads": torch.get_num_threads()}
    print(f"\n{machine}\n{table}")
    path = save_report(__file__, {"policy": {"name": policy.name, "thresholds": policy.thresholds},
                                  "recalibrated": recalibrated, "machine": machine,
                                  "results": results, "table": table, "settings": vars(args)},
                       chosen_on={"thresholds": "val"})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
