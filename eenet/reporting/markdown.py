"""Markdown: a run's per-exit table and generic tables for reports and experiment scripts.

:func:`results_markdown` reads a run's results in the vocabulary of
``results.json`` (:mod:`eenet.reporting.results`): a
:class:`~eenet.reporting.results.RunResults` or the mapping it writes.
"""

from __future__ import annotations

from typing import Any, Sequence


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats are printed with 4 significant decimals."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def results_markdown(results, timing: bool = True) -> str:
    """The per-exit table, the policy summary, the per-sample latency (:func:`latency_lines`,
    when results.json's ``latency`` holds it) and (``timing``) the measured speed-up of a
    run's results."""
    if hasattr(results, "to_dict"):  # a RunResults
        results = results.to_dict()
    pol = results["policy"]
    lines = [
        f"Dataset {results['dataset']}, backbone {results['backbone']}: "
        f"{results['backbone_macs'] / 1e6:.3f} M MACs per sample (fvcore: one multiply-add = one flop).",
        "",
        "| exit | after stage | MACs | cost fraction | val acc | test acc | test exit rate |",
        "|---|---|---|---|---|---|---|",
    ]
    rates = results["test"]["exit_rates"]
    for e, r in zip(results["exits"], rates):
        lines.append(f"| {e['name']} | {e['stage']} | {e['macs'] / 1e6:.3f} M | "
                     f"{e['cost_fraction']:.3f} | {100 * e['val_accuracy']:.2f} | "
                     f"{100 * e['test_accuracy']:.2f} | {100 * r:.1f}% |")
    t = results["test"]
    lines += ["", f"Policy {pol['name']} (thresholds {pol['thresholds']}): test accuracy "
                  f"{100 * t['accuracy']:.2f}% at average cost fraction {t['avg_cost_fraction']:.3f} "
                  f"(n={t['n']})."]
    if "mixture_acc" in t:
        lines.append(f"EENet mixture P_0: test accuracy {100 * t['mixture_acc']:.2f}%, "
                     f"expected cost E[C_0] {t['expected_cost']:.3f}.")
    if "oracle_acc" in t:
        over = [f"{e['name']} {100 * e['test_overthinking']:.2f}%" for e in results["exits"][:-1]
                if "test_overthinking" in e]
        lines.append(f"Overthinking (right at the exit, wrong at the final exit): "
                     f"{', '.join(over) or '-'}; oracle accuracy {100 * t['oracle_acc']:.2f}%.")
    temperature = (results.get("calibration") or {}).get("temperature")
    if temperature:
        lines.append(temperature_line(temperature))
    lat = results.get("latency")
    if isinstance(lat, dict) and "p95_ms" in lat:  # the tail figures (not the exit table alone)
        lines += ["", *latency_lines(lat)]
    engine = results.get("engine") or {}
    if timing and engine.get("speedup") is not None:
        lines.append(engine_timing_line(results))
    return "\n".join(lines)


def temperature_line(section: dict) -> str:
    """The temperatures an evaluation fitted on val and the summed per-exit ECE before and
    after, on val and test (``calibration.temperature`` of results.json)."""
    temps = ", ".join(f"{t:.3f}" for t in section["fit"]["temperatures"])
    ece = "; ".join(f"{split} {100 * section[split]['ece_sum_before']:.2f}% -> "
                    f"{100 * section[split]['ece_sum_after']:.2f}%" for split in ("val", "test"))
    clamped = [str(i) for i, b in enumerate(section["fit"]["at_bound"]) if b]
    note = (f" (exit {', '.join(clamped)}: the NLL minimum lies outside the searched interval, "
            f"T clamped to its end)") if clamped else ""
    return (f"Temperatures per exit (fitted by NLL on {section['fitted_on']}, used by the policy): "
            f"{temps}{note}; summed per-exit ECE ({section['ece_bins']} bins): {ece}.")


def engine_timing_line(results: dict) -> str:
    """The measured wall-clock time of the dynamic engine against the final exit alone, with
    the test accuracy of each, from an evaluation's results."""
    engine, t = results["engine"], results["test"]
    final = (results.get("calibration") or {}).get("final_exit_test")
    accuracy = f"test accuracy {100 * t['accuracy']:.2f}%" + (
        f" (the final exit alone: {100 * final['accuracy']:.2f}%)" if final else "")
    return (f"Measured on the test split ({t['n']} samples, batch {engine['batch_size']}, "
            f"{engine['threads']} thread(s), median of {engine['timed_passes']} interleaved "
            f"passes): dynamic engine {engine['dynamic_wall_s']:.4f} s, the network run to its "
            f"final exit with every early exit off {engine['final_exit_wall_s']:.4f} s: "
            f"{engine['speedup']:.2f}x faster, {accuracy}.")


def _tail(part: dict) -> str:
    return (f"mean {part['mean_ms']:.4f} ms, p50 {part['p50_ms']:.4f}, p95 {part['p95_ms']:.4f}, "
            f"p99 {part['p99_ms']:.4f}, max {part['max_ms']:.4f} ms")


def latency_lines(lat: dict) -> list[str]:
    """The lines of results.json's ``latency`` section (eenet-eval): the backend, mean / p50 /
    p95 / p99 / max per sample at batch 1 of the dynamic and of the plain run, the measured
    speed-ups, the calibrated expectation against the measured time (latency as the cost), and
    the budgets in milliseconds with what was expected and measured."""
    plain = lat["plain"]
    lines = [f"Per-sample latency on test, batch 1, engine={lat['backend']} ({lat['samples']} "
             f"samples, {lat['threads']} thread(s), interleaved with the plain run): "
             f"{_tail(lat)}.",
             f"The plain run (every early exit off, engine={plain['backend']}): {_tail(plain)}: "
             f"measured speed-up {lat['speedup']:.2f}x (mean), {lat['speedup_p95']:.2f}x (p95)."]
    exp = lat.get("expected")
    if exp:
        ratio = f"{exp['measured_over_expected']:.3f}x the expectation"
        if exp.get("measured_p95_over_expected") is not None:
            ratio += f" ({exp['measured_p95_over_expected']:.3f}x for the p95)"
        lines.append(f"Calibrated on val with measured latencies as the cost: expected mean "
                     f"{exp['mean_ms_val']:.4f} ms (p95 {exp['p95_ms_val']:.4f}), measured "
                     f"{exp['measured_mean_ms']:.4f} ms (p95 {exp['measured_p95_ms']:.4f}): "
                     f"{ratio}.")
    b = lat.get("budget")
    if b:
        def held(key: str) -> str:
            return "within" if b[key] else "over"

        asked = " and ".join(f"{k}={b[k]:g}" for k in ("budget_ms", "budget_p95_ms") if k in b)
        expected = f"expected mean {b['expected_mean_ms']:.4f} ms" + (
            f", p95 {b['expected_p95_ms']:.4f} ms" if "expected_p95_ms" in b else "")
        mean = f"mean {b['measured_mean_ms']:.4f} ms" + (
            f" ({held('measured_within_budget')} the budget)"
            if "measured_within_budget" in b else "")
        p95 = f"p95 {b['measured_p95_ms']:.4f} ms" + (
            f" ({held('measured_p95_within_budget')} the p95 budget)"
            if "measured_p95_within_budget" in b else "")
        lines.append(f"{asked}: {expected} on val; measured on test {mean}, {p95}, test "
                     f"accuracy {100 * b['test_accuracy']:.2f}%.")
    return lines
