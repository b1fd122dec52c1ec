"""The evaluation job: calibrate exit thresholds on val, evaluate with real early exit on test.

``evaluate(cfg)`` is what the command ``eenet-eval`` (:mod:`eenet.cli.eval`) runs:

    eenet-eval run=RUN_DIR budget=0.5          # best accuracy at average cost fraction <= 0.5
    eenet-eval run=RUN_DIR tolerance=0.3       # cheapest point within 0.3 accuracy points
    eenet-eval run=RUN_DIR tolerance=1 policy=max_prob latency=true
    eenet-eval run=RUN_DIR min_accuracy=0.84   # e.g. a model without exits' val accuracy - 1 point
    eenet-eval run=RUN_DIR tolerance=1 policy=max_prob temperature=true
    eenet-eval run=RUN_DIR budget_ms=0.2 engine=onnxruntime   # milliseconds per sample
    eenet-eval run=RUN_DIR budget_ms=0.2 budget_p95_ms=0.3    # and the expected p95 too

It loads a run written by ``eenet-train`` (``config.yaml`` and ``model.pt``,
read with ``torch.load(..., weights_only=True)``), caches every exit's outputs
on the validation split, chooses per-exit thresholds there
(:mod:`eenet.calibration.search`), then runs the test split through the
dynamic engine (:mod:`eenet.inference.engine`), which really stops computing
for samples that leave. Nothing is tuned on test: the test curve in the plot
evaluates the validation-chosen threshold vectors, for reporting only.

What the user saves is measured, not computed from MACs: the test split goes
through the dynamic engine and through the same network run to its final exit
with every early exit off (the stages and the final head only), batch by batch
in ``timing_passes`` interleaved passes (:func:`time_against_final_exit`); the
medians and their ratio are the ``engine`` section's ``dynamic_wall_s``,
``final_exit_wall_s`` and ``speedup``.

``temperature=true`` (policies ``max_prob`` and ``entropy``, whose scores are a
softmax of the exit's logits) fits one temperature per exit by NLL on the
validation split only (:mod:`eenet.calibration.temperature`; Guo et al., ICML
2017) and gives them to the policy, so that the thresholds are searched, and the
dynamic engine run, on softmax(z_i / T_i); ``results.json`` records them in
``policy.temperatures`` (and ``eenet-export eval=results.json`` in the manifest)
and in ``calibration.temperature`` the fit and the per-exit expected calibration
error (15 bins) on val and test before and after. ``confidence`` (EENets' learned
confidence head) and ``patience`` (argmaxes) have no logits temperature: asking for
one with them is refused in one line. ``temperature=false`` (the default) runs
exactly what eenet-eval ran before the option existed.

Backends and latency (issue 19). ``engine=eager|compiled|onnxruntime``
(:mod:`eenet.inference.backends`, built once per run and weights, cached in
``RUN_DIR/engine_cache``) runs the test pass, the timings and the latency
measurements; the static pass for the per-exit figures stays eager. ``cost=latency``
calibrates on the per-exit latency table measured on that backend at batch 1
(:func:`eenet.inference.latency.latency_cost_table`; the table at ``batch_size`` is
recorded too) instead of MACs, and ``budget_ms=M`` chooses the most accurate thresholds
whose expected time per sample at batch 1, sum_i rate_i(t) x ms_i over val's exit rates,
is <= M ms (a budget below every sample at its earliest exit is refused).
``budget_p95_ms=P`` bounds the expected p95 of that time (the smallest per-exit time ms_i
whose exits with ms_j <= ms_i take >= 95 % of val's samples) by P ms, alone or with
``budget_ms`` (then both hold). Then, and with ``tail_latency=true``, results.json's
``latency`` section holds the per-sample latency at batch 1 on test (``p50_ms``, ``p95_ms``,
``p99_ms``, ``max_ms``, ``mean_ms``, ``backend``) of the calibrated engine and, timed
interleaved with it, of the plain run on the same backend (``plain``), their ratio
(``speedup``), the tables and the calibrated expectation (mean and p95) next to the measured
time (``expected``, ``budget``). The val and test sections' costs stay MAC fractions; the
calibration's curve is in the units it searched. ``latency`` is always a mapping:
``latency=true`` adds the eager per-exit table as its ``exit_table`` (alone, when no
per-sample latency is measured).

Writes into its own folder (``<run>/eval/<time>`` unless ``hydra.run.dir`` says
otherwise): ``results.json`` (:class:`eenet.reporting.results.RunResults`: the
training results' layout with test figures from the dynamic engine, plus
``calibration`` and ``engine``), ``results.md``, ``curve.png`` (with a guarantee:
the certified point beside the uncorrected search's for the same level),
``exits.png``, ``reliability.png`` (per exit, on test; before and after the
temperatures with ``temperature=true``) and, with the ``latency`` key of
results.json, ``latency.json`` (the same). The folder must be new or empty (``overwrite=true`` replaces an
earlier evaluation's files); it is claimed through :mod:`eenet.run_folder` once
the run folder was checked: an ``INCOMPLETE`` marker (and lock) first,
``results.json`` after every other file, the marker removed last.
An incomplete folder of an earlier eenet-eval (killed) is replaced by a rerun.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Iterable

import torch
from omegaconf import DictConfig, OmegaConf

from eenet.calibration import Calibrator, cache_exit_outputs, paired_drop
from eenet.calibration.guarantee import GuaranteeResult, certify_with
from eenet.calibration.risk import exit_losses
from eenet.calibration.temperature import (ECE_BINS, METHOD, TemperatureFit, apply_temperatures,
                                           exit_reliability, fit_temperatures,
                                           split_calibration_errors)
from eenet.config_checks import MS_BUDGETS, check_eval_config
from eenet.data.batching import make_loader
from eenet.errors import EENetError
from eenet.inference import DynamicEngine, create_engine, exit_latency_table, latency_cost_table
from eenet.inference.backends import BackendEngine
from eenet.inference.latency import TAIL_KEYS, tail_latencies
from eenet.io import atomic_write_text
from eenet.policies import create_policy
from eenet.reporting.experiment import run_machine
from eenet.reporting.markdown import engine_timing_line, markdown_table, results_markdown
from eenet.reporting.plots import plot_curve, plot_exit_distribution, plot_reliability
from eenet.reporting.results import (EngineResult, EvaluationRecord, RunResults, SplitResult,
                                     latency_section, write_results)
from eenet.reporting.wandb import log_evaluation_results
from eenet.run_folder import OutputFolder, claim_output_folder
from eenet.runs import load_run
from eenet.training.metrics import overthinking_counts

#: What eenet-eval writes into its folder (removed first when the folder is replaced).
OUTPUTS = ("results.json", "results.md", "curve.png", "exits.png", "reliability.png",
           "latency.json")


def time_against_final_exit(engine: DynamicEngine, final: DynamicEngine,
                            batches: Iterable, passes: int) -> tuple[list[float], list[float]]:
    """Seconds per pass over ``batches`` (re-iterable) of ``engine`` and of ``final``.

    Each pass runs both on every batch, alternating which goes first (batch by
    batch and pass by pass), so a slow spell of the machine falls on both;
    only the network calls are timed, not loading the batches. One untimed
    batch warms both up first.

    Returns:
        ``(engine seconds per pass, final seconds per pass)``, ``passes`` each.
    """
    for x, _ in batches:  # warm-up
        engine(x)
        final(x)
        break
    dyn, fin = [], []
    for p in range(passes):
        spent = [0.0, 0.0]
        for b, (x, _) in enumerate(batches):
            order = (0, 1) if (p + b) % 2 == 0 else (1, 0)
            for k in order:
                t0 = time.perf_counter()
                (engine, final)[k](x)
                spent[k] += time.perf_counter() - t0
        dyn.append(spent[0])
        fin.append(spent[1])
    return dyn, fin


def evaluate(cfg: DictConfig) -> dict:
    """Calibrate on val for ``cfg.budget`` or ``cfg.tolerance``, evaluate on test; write the report.

    Returns the mapping written to ``results.json`` (:class:`RunResults`'s layout).
    """
    check_eval_config(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    passes = cfg.get("timing_passes") or 0  # an integer >= 0: check_eval_config
    train_cfg, dm, net, cost = load_run(cfg.run, cfg.get("data_root"))
    folder = claim_output_folder(cfg.output_dir, "eenet-eval", OUTPUTS, key="hydra.run.dir",
                                 overwrite=bool(cfg.get("overwrite")))
    with folder:  # an exception leaves the folder marked INCOMPLETE (or removes it if unused)
        return _calibrate_test_and_write(cfg, folder, train_cfg, dm, net, cost, passes)


def wants_tail(cfg: DictConfig) -> bool:
    """Whether the evaluation measures per-sample latency (the ``latency`` section): asked
    for (``tail_latency=true``), or implied by a backend other than eager, latency as the
    cost, ``budget_ms`` or ``budget_p95_ms``."""
    return bool(cfg.get("tail_latency")) or (cfg.get("engine") or "eager") != "eager" \
        or latency_is_cost(cfg)


def ms_budgets(cfg: DictConfig) -> dict[str, float]:
    """The budgets in milliseconds given (``budget_ms``, ``budget_p95_ms``)."""
    return {k: float(cfg.get(k)) for k in MS_BUDGETS if cfg.get(k) is not None}


def latency_is_cost(cfg: DictConfig) -> bool:
    """``cost=latency``, or a budget in milliseconds given (which needs it; ``cost=macs`` with
    one is refused by :func:`eenet.config_checks.check_eval_config`)."""
    return cfg.get("cost") == "latency" or bool(ms_budgets(cfg))


def _plain_engine(cfg: DictConfig, net, cost, input_size) -> BackendEngine:
    """The network run by ``cfg.engine`` with every early exit off (the plain run); its
    steps (traced / exported once, cached under ``engine_cache``) serve every engine of
    this evaluation."""
    backend = cfg.get("engine") or "eager"
    cache = None
    if backend != "eager":
        cache = Path(cfg.get("engine_cache") or Path(cfg.run) / "engine_cache") / backend
    threads = int(cfg.threads) if cfg.get("threads") else torch.get_num_threads()
    try:
        return create_engine(net, create_policy("confidence", math.inf), cost, backend=backend,
                             cache_dir=cache, input_size=input_size, threads=threads)
    except OSError as exc:
        raise EENetError(f"engine={backend} cannot keep its build in {cache}: "
                         f"{exc.strerror or exc}; give engine_cache=<a folder you can write>") \
            from None


def _calibrate_test_and_write(cfg: DictConfig, folder: OutputFolder, train_cfg: DictConfig, dm,
                              net, cost, passes: int) -> dict:
    out_dir = folder.path
    n_exits = net.num_exits
    bs = int(cfg.batch_size)
    size = tuple(dm.input_size)

    def test_batches():
        return make_loader(dm.test_dataset, bs, shuffle=False)

    # 0. the backend: the plain run (every early exit off) on it, and, for latency as the
    # cost, its measured per-exit latency table at batch 1 (the calibration's cost: time per
    # sample, what budget_ms bounds) and at the evaluation's batch size (recorded)
    plain = _plain_engine(cfg, net, cost, size)
    backend = plain.backend
    tables = {}
    if latency_is_cost(cfg):
        # the plain engine's own build (its steps and, with onnxruntime, its single-sample
        # walk), so the tables time the calls the calibrated engine makes
        probe = plain.with_policy(create_policy(cfg.policy, [math.inf] * (n_exits - 1)), cost)
        for b in dict.fromkeys((1, bs)):
            tables[b] = latency_cost_table(probe, size, batch_size=b, repeats=50 if b == 1 else 20,
                                           min_seconds=0.2)
    cal_cost = tables[1] if tables else cost

    # 1. calibrate on the validation split only
    val = cache_exit_outputs(net, make_loader(dm.val_dataset, bs, shuffle=False))
    fit = _fit_temperatures(cfg, val)  # temperature=true: on val, never on test
    temps = fit.temperatures if fit is not None else None
    cal = Calibrator(val, cfg.policy, cal_cost, grid=int(cfg.grid), temperatures=temps)
    guarantee = None
    if cfg.get("guarantee"):
        guarantee = certify_with(cal, exit_losses(val, cfg.risk), cfg.risk, cfg.guarantee,
                                 float(cfg.alpha), float(cfg.delta),
                                 optimism_folds=int(cfg.get("optimism_folds") or 0) or 5,
                                 optimism_repeats=int(cfg.get("optimism_repeats") or 1))
        # the uncorrected search for the same level draws the curve; the certified point is chosen
        level = {"min_accuracy": 1 - float(cfg.alpha)} if cfg.risk == "error" \
            else {"tolerance": 100 * float(cfg.alpha)}
        res = cal.calibrate(**level)
        res.target = {**res.target, "kind": "guarantee", "guarantee": cfg.guarantee,
                      "risk": cfg.risk, "alpha": float(cfg.alpha), "delta": float(cfg.delta)}
        res.chosen, res.reachable, res.message = (guarantee.chosen, guarantee.certified,
                                                  guarantee.message)
        if cal.ms_per_unit is not None:  # the certified point's expected time, not the search's
            res.target["expected_ms"] = res.chosen.avg_cost * float(cal.ms_per_unit)
            res.target["expected_p95_ms"] = float(cal.expected_quantile_ms(
                cal.score_vector(res.chosen.thresholds).view(1, -1))[0])
    else:
        res = cal.calibrate(budget=cfg.get("budget"), tolerance=cfg.get("tolerance"),
                            min_accuracy=cfg.get("min_accuracy"),
                            optimism_folds=int(cfg.get("optimism_folds") or 0),
                            optimism_repeats=int(cfg.get("optimism_repeats") or 1),
                            budget_ms=cfg.get("budget_ms"),
                            budget_p95_ms=cfg.get("budget_p95_ms"))
        if ms_budgets(cfg) and not res.reachable:
            raise EENetError(_unreachable_ms(cfg, res.target, backend))
    policy = create_policy(cfg.policy, res.chosen.thresholds, temps)

    # 2. test with the dynamic engine on the backend: real early exit
    engine = plain.with_policy(policy, cost)
    preds, exits, ys = [], [], []
    t0 = time.perf_counter()
    for x, y in test_batches():
        out = engine(x)
        preds.append(out.pred)
        exits.append(out.exit)
        ys.append(y)
    engine_s = time.perf_counter() - t0
    pred, exit_idx, y = torch.cat(preds), torch.cat(exits), torch.cat(ys)

    # 3. per-exit test accuracy and the test curve, from a static pass (reporting only)
    test = cache_exit_outputs(net, test_batches())
    static_exits = policy.decide(test.outputs)
    agree = float((static_exits == exit_idx).double().mean())
    over, oracle = overthinking_counts(test.correct)
    # the engine's costs: the heads of idle exits (threshold inf) are not run
    test_result = SplitResult.from_counts(
        torch.bincount(exit_idx, minlength=n_exits), (pred == y).sum(), engine.costs,
        exit_correct=test.correct.sum(0), overthink=over, oracle_correct=oracle)
    chosen = res.chosen
    # the val section's cost is in MACs (results.json's vocabulary) also when the calibration
    # searched measured latencies
    val_macs = chosen.avg_cost if not tables else Calibrator(
        val, cfg.policy, cost, grid=2, temperatures=temps).point(
        cal.score_vector(chosen.thresholds)).avg_cost
    val_result = SplitResult(accuracy=chosen.accuracy, avg_cost_fraction=val_macs,
                             exit_rates=chosen.exit_rates, n=len(val),
                             exit_accuracy=val.correct.double().mean(0).tolist())
    # in the calibration's cost units
    test_cal = Calibrator(test, cfg.policy, cal_cost, grid=2, temperatures=temps)

    def on_test(points):
        vecs = torch.stack([cal.score_vector(p.thresholds) for p in points])
        a, c, _ = test_cal.evaluate(vecs)
        return list(zip(c.tolist(), a.tolist()))

    # drop against the final exit on the same samples, with its paired standard error
    drops = {"val": paired_drop(val.correct[:, -1],
                                cal.correct_at(cal.score_vector(chosen.thresholds))),
             "test": paired_drop(test.correct[:, -1], pred == y)}
    never = torch.full((1, n_exits - 1), float("inf"))  # score units: no early exit releases
    final_test = SplitResult(accuracy=float(test.correct[:, -1].double().mean()),
                             avg_cost_fraction=float(test_cal.evaluate(never)[1][0]),
                             exit_rates=[0.0] * (n_exits - 1) + [1.0], n=len(test))
    calibration = res.to_dict()
    if guarantee is not None:  # method, risk, alpha, delta, n, p-value or bound, the cost paid
        calibration["guarantee"] = guarantee.to_dict()
    calibration["test_curve"] = [{"avg_cost": c, "accuracy": a} for c, a in on_test(res.curve)]
    calibration["final_exit_test"] = {"accuracy": final_test.accuracy,
                                      "avg_cost": final_test.avg_cost_fraction}
    if fit is not None:  # the fit on val, per-exit ECE on val and test before and after
        calibration["temperature"] = _temperature_section(fit, val, test)

    # 4. measured: the dynamic engine against the same network run to its final exit
    timing = EngineResult(batch_size=bs, wall_s=engine_s, agreement_with_static=agree,
                          machine=run_machine())
    if passes:
        # every early exit off, on the same backend: only the stages and the final head run
        dyn, fin = time_against_final_exit(engine, plain, test_batches(), passes)
        timing.dynamic_wall_s = statistics.median(dyn)
        timing.final_exit_wall_s = statistics.median(fin)
        timing.speedup = timing.final_exit_wall_s / timing.dynamic_wall_s
        timing.timed_passes, timing.threads = passes, torch.get_num_threads()
        timing.dynamic_pass_s, timing.final_exit_pass_s = dyn, fin

    results = RunResults.build(
        dataset=train_cfg.dataset.name, backbone=train_cfg.backbone.name,
        num_classes=net.num_classes, cost=cost, val=val_result, test=test_result,
        policy={"name": cfg.policy, "thresholds": calibration["chosen"]["thresholds"],
                **({} if temps is None else {"temperatures": temps})},
        config=OmegaConf.to_container(train_cfg, resolve=True),
        evaluation=EvaluationRecord(run=str(Path(cfg.run).resolve()), target=res.target,
                                    calibration=calibration, engine=timing,
                                    drop_vs_final_exit=drops))

    # 5. write: results.json last, after every other file (the folder is complete once
    # it is there and the INCOMPLETE marker is gone)
    latency = {}  # always a mapping: the per-sample figures and / or the eager exit table
    if wants_tail(cfg):
        latency = _latency_section(cfg, engine, plain, test_batches(), tables, res, test_cal,
                                   test_result)
    if cfg.get("latency"):
        latency["exit_table"] = exit_latency_table(net, size, batch_sizes=(1, bs))
    results.latency = latency or None
    folder.clear(OUTPUTS)
    if results.latency is not None:
        atomic_write_text(out_dir / "latency.json", json.dumps(results.latency, indent=2) + "\n")
    saved = results.to_dict()
    curves = {"val (shared threshold)": [(p.avg_cost, p.accuracy) for p in res.curve],
              "test (same thresholds)": on_test(res.curve),
              "val Pareto (per-exit thresholds)": [(p.avg_cost, p.accuracy) for p in res.pareto]}
    points = {**(_guarantee_points(guarantee) if guarantee is not None else
                 {f"chosen on val ({res.target['kind']})": (chosen.avg_cost, chosen.accuracy)}),
              "chosen, on test": (test_result.avg_cost_fraction, test_result.accuracy),
              "final exit only (val)": (res.reference.avg_cost, res.reference.accuracy),
              "final exit only (test)": (final_test.avg_cost_fraction, final_test.accuracy)}
    title = f"{train_cfg.dataset.name} / {train_cfg.backbone.name}, policy {cfg.policy}"
    plot_curve(out_dir / "curve.png", curves, points, title)
    plot_exit_distribution(out_dir / "exits.png", {"val": val_result.exit_rates,
                                                  "test": test_result.exit_rates},
                           net.exit_names(), title)
    _plot_reliability(out_dir / "reliability.png", test, fit, net.exit_names(), title)
    if cfg.get("wandb"):
        log_evaluation_results({**OmegaConf.to_container(cfg.wandb),
                                "config": {"eval": OmegaConf.to_container(cfg),
                                           "train": saved["config"]}}, saved, out_dir)
    write_results(out_dir, saved)
    return saved


def _fit_temperatures(cfg: DictConfig, val) -> TemperatureFit | None:
    """``temperature=true``: one temperature per exit (final included) fitted by NLL on the
    validation outputs ``val`` (never on test); ``None`` otherwise. The policy was checked
    to take temperatures (``check_eval_config``)."""
    if not cfg.get("temperature"):
        return None
    return fit_temperatures(val)


def _temperature_section(fit: TemperatureFit, val, test) -> dict:
    """``calibration.temperature`` of results.json: the fit on val and the per-exit ECE of val
    and test before and after (the sums are over every exit, the final one included)."""
    return {"method": METHOD, "fitted_on": "val", "ece_bins": ECE_BINS, "fit": fit.to_dict(),
            "val": split_calibration_errors(fit.temperatures, val),
            "test": split_calibration_errors(fit.temperatures, test)}


def _plot_reliability(path: Path, test, fit: TemperatureFit | None, exit_names, title: str) -> Path:
    """reliability.png: per exit, accuracy against max-softmax confidence on test (15 bins),
    before and after the temperatures when they were fitted."""
    def diagram(cached):
        return [exit_reliability(lg, cached.targets) for lg in cached.logits]

    diagrams = {"raw": diagram(test)} if fit is None else {
        "before": diagram(test), "after (T fitted on val)":
            diagram(apply_temperatures(test, fit.temperatures))}
    return plot_reliability(path, diagrams, exit_names, f"{title}: test split")


def _guarantee_points(g: GuaranteeResult) -> dict[str, tuple[float, float]]:
    """curve.png's markers of a certified calibration, both on val: the certified point and
    the uncorrected search's for the same alpha (when it ran and reached it)."""
    level = f"{g.risk} <= {g.alpha:g}"
    points = {f"certified ({g.method}, {level}, delta {g.delta:g}), val":
              (g.chosen.avg_cost, g.chosen.accuracy)}
    e = g.empirical
    if e is not None and e.get("reachable"):
        points[f"uncorrected search ({level}), val"] = (e["avg_cost"], e["accuracy"])
    return points


def _unreachable_ms(cfg: DictConfig, target: dict, backend: str) -> str:
    """The one line of a budget in milliseconds that no thresholds meet on val."""
    budgets = ms_budgets(cfg)
    mean, p95 = target["expected_ms"], target["expected_p95_ms"]
    if len(budgets) == 2:
        return (f"budget_ms={cfg.budget_ms} and budget_p95_ms={cfg.budget_p95_ms} cannot both "
                f"hold on engine={backend}: the nearest thresholds expect {mean:.4f} ms per "
                f"sample and a p95 of {p95:.4f} ms at batch 1 (measured here); give larger "
                f"budgets")
    if "budget_ms" in budgets:
        return (f"budget_ms={cfg.budget_ms} is below the cheapest possible on engine={backend}: "
                f"{mean:.4f} ms per sample at batch 1 with every sample leaving as early as it "
                f"can (measured here); give budget_ms >= that")
    return (f"budget_p95_ms={cfg.budget_p95_ms} is below the lowest possible on "
            f"engine={backend}: an expected p95 of {p95:.4f} ms per sample at batch 1, the "
            f"lowest any thresholds reach (measured here); give budget_p95_ms >= that")


def _latency_section(cfg: DictConfig, engine: BackendEngine, plain: BackendEngine, batches,
                     tables: dict, res, test_cal: Calibrator, test_result: SplitResult) -> dict:
    """The ``latency`` section: per-sample latency at batch 1 on test of the calibrated engine
    (top-level keys ``p50_ms`` .. ``mean_ms``, ``backend``) and of the plain run on the same
    backend (``plain``), timed interleaved (:func:`eenet.inference.latency.tail_latencies`);
    the speed-ups of the mean and the p95; with latency as the cost, the tables and the
    calibrated expectation of the mean and the p95 next to the measured times (``expected``),
    and ``budget`` for ``budget_ms`` and / or ``budget_p95_ms``."""
    limit = cfg.get("latency_samples")
    singles: list = []
    for x, _ in batches:
        singles.extend(x.split(1))
        if limit is not None and len(singles) >= limit:
            break
    singles = singles[:limit] if limit is not None else singles
    tails = tail_latencies({"dynamic": engine, "plain": plain}, singles)
    dyn, fin = tails["dynamic"], tails["plain"]
    section = {k: dyn[k] for k in TAIL_KEYS}
    section.update(batch_size=1, samples=dyn["samples"], threads=torch.get_num_threads(),
                   exit_ms=dyn["exit_ms"],
                   plain={k: fin[k] for k in (*TAIL_KEYS, "samples")},
                   speedup=fin["mean_ms"] / dyn["mean_ms"],
                   speedup_p95=fin["p95_ms"] / dyn["p95_ms"],
                   build_seconds=engine.build_seconds,
                   first_call_seconds=engine.first_call_seconds)
    if tables:
        table = tables[1]
        vec = test_cal.score_vector(res.chosen.thresholds)
        on_test = float(test_cal.evaluate(vec.view(1, -1))[1][0]) * table.final_ms
        # the calibrated point's expected p95 under val's exit rates (what budget_p95_ms
        # bounds; the calibrator's own figure is the target's expected_p95_ms) and test's
        p95_val = table.expected_percentile_ms(res.chosen.exit_rates, 95, engine.skipped)
        section["cost_tables"] = {str(b): t.to_dict() for b, t in tables.items()}
        section["expected"] = {
            "mean_ms_val": res.target["expected_ms"],  # the calibrated point, val exit rates
            "p95_ms_val": p95_val,
            "mean_ms_test_rates": on_test,  # the same table, test's exit rates
            "p95_ms_test_rates": table.expected_percentile_ms(test_result.exit_rates, 95,
                                                              engine.skipped),
            "measured_mean_ms": dyn["mean_ms"], "measured_p95_ms": dyn["p95_ms"],
            "measured_over_expected": dyn["mean_ms"] / res.target["expected_ms"],
            "measured_p95_over_expected": dyn["p95_ms"] / p95_val}
    budgets = ms_budgets(cfg)
    if budgets:
        within = {"budget_ms": ("measured_within_budget", "mean_ms"),
                  "budget_p95_ms": ("measured_p95_within_budget", "p95_ms")}
        section["budget"] = {**budgets, "expected_mean_ms": res.target["expected_ms"],
                             "expected_p95_ms": res.target["expected_p95_ms"],
                             "measured_mean_ms": dyn["mean_ms"], "measured_p95_ms": dyn["p95_ms"],
                             **{within[k][0]: dyn[within[k][1]] <= v for k, v in budgets.items()},
                             "test_accuracy": test_result.accuracy}
    return section


def report(results: dict) -> str:
    """The printed report: per-exit table (with the per-sample latency lines of results.md),
    calibration and engine lines, the eager per-exit latency table, and last what early exit
    saved, measured (the same line as in results.md)."""
    cal = results["calibration"]
    t = results["target"]
    if t["kind"] == "guarantee":
        target = (f"a certified {t['risk']} risk <= {100 * t['alpha']:g} points with probability "
                  f">= {1 - t['delta']:g} ({t['guarantee']})")
    elif t["kind"] == "budget":
        target = f"budget {t['value']}"
    elif t["kind"] == "budget_ms":
        target = f"budget_ms {t['value']:g} (expected time per sample at batch 1)"
        if t.get("budget_p95_ms") is not None:
            target += f" and budget_p95_ms {t['budget_p95_ms']:g} (its expected p95)"
    elif t["kind"] == "budget_p95_ms":
        target = f"budget_p95_ms {t['value']:g} (expected p95 of the time per sample at batch 1)"
    elif t["kind"] == "min_accuracy":
        target = f"val accuracy >= {100 * t['min_accuracy']:.2f}%"
    else:
        target = f"tolerance {t['value']} points (val accuracy >= {100 * t['min_accuracy']:.2f}%)"
    ch = cal["chosen"]
    lines = [results_markdown(results, timing=False), "",
             f"Calibrated on val for {target}: {cal['message']}.",
             f"Thresholds ({cal['policy']}): {ch['thresholds']}",
             *_guarantee_lines(cal.get("guarantee")),
             f"Final exit only: val {100 * cal['reference_final_exit']['accuracy']:.2f}%, "
             f"test {100 * cal['final_exit_test']['accuracy']:.2f}%.",
             f"Dynamic engine on test: batch {results['engine']['batch_size']}, "
             f"{results['engine']['wall_s']:.2f} s, decisions equal to static path + policy "
             f"for {100 * results['engine']['agreement_with_static']:.2f}% of samples."]
    rows_table = latency_section(results.get("latency")).get("exit_table") or []
    if rows_table:
        rows = [[r["exit"], r["batch_size"], f"{r['ms_per_batch']:.3f}", f"{r['us_per_sample']:.1f}",
                 f"{r['fraction_of_final']:.3f}"] for r in rows_table]
        lines += ["", "Measured latency to reach and evaluate each exit (eager):", "",
                  markdown_table(["exit", "batch", "ms / batch", "us / sample",
                                  "fraction of final"], rows)]
    if results["engine"].get("speedup") is not None:  # last, as in results.md
        lines += ["", engine_timing_line(results)]
    return "\n".join(lines)


def _guarantee_lines(g: dict | None) -> list[str]:
    """The certified point against the uncorrected search, for the printed report."""
    if not g:
        return []
    stat = f"p-value {g['p_value']:.3g}, " if g.get("p_value") is not None else ""
    lines = [f"Guarantee ({g['method']}, {g['guarantee']}): n = {g['n']} ({g['n_order']} order the path, "
             f"{g['n_test']} test it); {stat}bound {g['bound']:.4f} at the chosen point."]
    if g.get("empirical") and g.get("cost_of_guarantee") is not None:
        lines.append(f"Uncorrected search for the same level: cost {g['empirical']['avg_cost']:.4f}; "
                     f"the guarantee costs {g['cost_of_guarantee']:+.4f} of the average cost.")
    return lines

