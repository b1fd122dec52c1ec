"""The papers' tables as commands: Hydra sweeps, calibrated evaluation, one markdown + JSON each.

    python experiments/tables.py eenets            # make table-eenets
    python experiments/tables.py baselines         # make table-baselines
    python experiments/tables.py pteenet           # make table-pteenet
    python experiments/tables.py trecx             # make table-trecx
    python experiments/tables.py all --smoke       # SMOKE=1 make tables: every pipeline on tiny data
    python experiments/tables.py trecx --cifar10 yes --seeds 0 1   # CIFAR10=1 make table-trecx ...

Every table runs real Hydra multirun sweeps (``eenet-train -m ...``, one folder
per job), evaluates each early-exit job with ``eenet-eval``'s code
(thresholds chosen on the validation split, test measured with the dynamic
engine) and writes ``experiments/results/<table>.md`` and ``.json`` (under
``experiments/results/smoke/`` with ``--smoke``). Each row records the sweep
command, the seed, the epochs and the wall time; the file records the machine.
With several seeds, accuracy is given as mean +- standard deviation.

Next to our numbers, each table quotes what the paper reports where we know
it, and lists every deviation from the paper's setting.

CIFAR-10 (JPEG) rows (issue 20) train by the short recipe
(``conf/experiment/cifar10_recipe/``) and take CPU hours, so they run only with
``--cifar10 yes`` (``make table-eenets CIFAR10=1``) or with ``--smoke`` (tiny
data; ``--cifar10 no`` leaves them out there too); otherwise a row whose sweep
already ran (same command) is read back, and any other shows "not run" with the
command that would make it, never a number.
Each row records its machine (``machine.json`` of its sweep).

A run trained by hand can stand for a sweep's job: ``--adopt KEY=RUN_FOLDER``
(repeatable; one folder per seed), KEY as the table prints it ("not run: KEY")::

    python experiments/tables.py baselines --adopt cifar10_jpeg_recipe_sdn_40ep=experiments/runs/x
    make table-baselines TABLE_ARGS="--adopt cifar10_jpeg_recipe_sdn_40ep=experiments/runs/x"

Before anything is trained or written, each adopted folder must exist and be a
finished eenet-train run (``results.json`` and ``model.pt``, no ``INCOMPLETE``
marker; its ``config.yaml`` is read as data, nothing is built from it), KEY must be
a sweep of the table (found by a first pass that trains nothing; a sweep that
follows another's jobs, such as pteenet's ``<backbone>_post_seed<N>`` whose config
names its backbone's folder, is not found so and cannot be adopted), the run's seed one of
``--seeds``, and its ``config.yaml`` must equal the config the sweep composes for
that seed (and one of its swept values) on every key but :data:`ADOPT_MAY_DIFFER`:
where things are, how the run is shown and logged, and how it computes (``threads``,
``channels_last``, ``trainer.precision``, ``data_root``,
``output_dir``, ``resume``, ``ckpt_path``, ``overwrite``, ``logger``, ``hydra``,
``trainer.enable_progress_bar``, ``trainer.enable_model_summary``);
``dataset.datamodule.root`` is compared as a path below each config's own
``data_root`` (the same data set, wherever the data lives). The thread count and the
memory order can change float rounding on a CPU, and a mixed precision more, so an adopted
run need not be bit-identical to what the sweep would train; its row records the run's own
threads and, where it was not float32, the precision it trained in. The table says which
rows are adopted, and their command is the run's own (``.hydra/overrides.yaml``
where Hydra wrote one, else its ``config.yaml``), never one that did not run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from eenet.errors import EENetError
from eenet.jobs.evaluate import evaluate
from eenet.reporting.experiment import git_revision, machine_info, provenance
from eenet.reporting.markdown import markdown_table
from eenet.reporting.results import trained_on, trained_precision
from eenet.io import atomic_write_text
from eenet.config import compose_config
from eenet.io import first_line
from eenet.run_folder import MARKER
from eenet.runs import check_run_folder
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
SMOKE = ["dataset.datamodule.train_subset=600", "dataset.datamodule.val_size=150",
         "dataset.datamodule.test_subset=200", "trainer.max_epochs=1", "anytime=false"]
CIFAR = "cifar10_jpeg"
NOT_RUN = "not run"
#: the CIFAR-10 (JPEG) rows' deviations shared by every table
CIFAR_DEVIATIONS = [
    "CIFAR-10 (JPEG): every image re-encoded as JPEG (about 2-3 points below the original "
    "pixels); 45,000 train / 5,000 val / 10,000 test.",
    "Short recipe (conf/experiment/cifar10_recipe/_recipe.yaml): SGD Nesterov, one-cycle "
    "stepped per optimizer step, label smoothing 0.1, batch 256, the epochs in the row's "
    "column (the recipe's 40 unless given); the papers train for hundreds of epochs.",
    "Rows give the seeds that ran; one seed where only one ran (no spread)."]

PAPER = {
    "eenets": "EENets (Demir & Akbas) report that early-exit ResNets reach accuracy similar to "
              "their versions without exits at about 20% of the computational cost, on MNIST, "
              "SVHN, CIFAR-10 and Tiny-ImageNet (abstract); their per-table figures are not "
              "available here.",
    "baselines": "BranchyNet and SDN report results on other networks (and BranchyNet on "
                 "other training budgets); SDN reports more than a 50% cut of the average "
                 "inference cost at preserved accuracy on CIFAR-10 (as issue 20 quotes it). No "
                 "per-row figure directly comparable with these rows is available here.",
    "pteenet": "PTEENet (Lahiany & Aperstein) report that post-trained branches reduce the "
               "average inference cost of ResNet, DenseNet and VGG on SVHN and CIFAR-10 at a "
               "controllable accuracy cost (abstract); their per-table figures are not "
               "available here.",
    "trecx": "T-RecX (Ghanathe & Wilton) report a 31.58% average reduction in FLOPs for one "
             "percent of accuracy over their three MLPerf Tiny models (abstract); the issue's "
             "reading of their ResNet-8 results is about 22%.",
}

# how each table's operating points are chosen (eenet.reporting.experiment.CHOSEN_ON): the
# eenets rows use EENets' fixed confidence threshold 0.5; the others calibrate on val
CHOSEN_ON = {
    "eenets": {"thresholds": "fixed", "lambda": "every"},
    "baselines": {"thresholds": "val"},
    "pteenet": {"thresholds": "val", "lambda": "every"},
    "trecx": {"thresholds": "val"},
}


#: Config keys on which an adopted run (``--adopt``) may differ from the sweep's config: where
#: things are and how the run is shown and logged, none of which defines the trained model
#: (``dataset.datamodule.root`` is compared below each config's own ``data_root``; the thread
#: count can change a CPU's float rounding, and the row records it; so does the precision
#: trained in, ``trainer.precision``, which the row's machine cell names when not float32).
ADOPT_MAY_DIFFER = ("threads", "channels_last", "trainer.precision", "data_root",
                    "dataset.datamodule.root", "output_dir", "resume",
                    "ckpt_path", "overwrite", "trainer.enable_progress_bar",
                    "trainer.enable_model_summary", "logger", "hydra")


class Adopted:
    """A finished run given with ``--adopt KEY=RUN``: its folder, config (as data), seed, command."""

    def __init__(self, key: str, path: Path):
        where = f"--adopt {key}={path}"
        if not path.is_dir():
            raise EENetError(f"{where}: no such folder")
        if (path / MARKER).exists():
            raise EENetError(f"{where}: not a finished run ({MARKER} is there: it is being written "
                             f"or stopped before it finished; let it finish, or continue it with "
                             f"eenet-train resume=true hydra.run.dir={path})")
        if not (path / "results.json").is_file():
            raise EENetError(f"{where}: not a finished eenet-train run (no results.json)")
        try:  # config.yaml read as data and checked (eenet.runs), nothing built from it
            cfg = OmegaConf.to_container(check_run_folder(path), resolve=False)
        except EENetError as exc:
            raise EENetError(f"{where}: {exc}") from exc
        if not isinstance(cfg.get("seed"), int):
            raise EENetError(f"{where}: its config.yaml has no integer seed")
        self.key, self.path, self.config, self.seed = key, path, cfg, cfg["seed"]
        self.threads = cfg.get("threads")
        overrides = path / ".hydra" / "overrides.yaml"
        ran = None
        if overrides.is_file():  # Hydra's record of the job's own command line, when it wrote one
            try:
                ran = OmegaConf.to_container(OmegaConf.load(overrides))
            except Exception:  # noqa: BLE001 - unreadable: fall back on config.yaml
                ran = None
        if isinstance(ran, list) and all(isinstance(o, str) for o in ran):
            self.command = f"adopted run {path}: eenet-train {shlex.join(ran)}"
        else:
            self.command = f"adopted run {path} (its config.yaml: {path / 'config.yaml'})"


def read_adopted(specs: list[str]) -> dict[str, list[Adopted]]:
    """``--adopt KEY=RUN`` arguments -> the runs of each key, every folder checked (one line)."""
    out: dict[str, list[Adopted]] = {}
    for spec in specs:
        key, eq, folder = spec.partition("=")
        if not eq or not key or not folder:
            raise EENetError(f"--adopt takes KEY=RUN_FOLDER (a sweep key as the table prints it, "
                             f"a finished eenet-train run), got '{spec}'")
        path = Path(folder).expanduser().absolute()
        if any(a.path == path for a in out.get(key, [])):
            raise EENetError(f"--adopt {key}={path} is given twice")
        out.setdefault(key, []).append(Adopted(key, path))
    return out


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict) and node:
        out: dict = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def _below(root, data_root) -> str:
    """A data set's folder as a path below its config's data root (itself when not below it)."""
    try:
        return str(Path(str(root)).relative_to(Path(str(data_root))))
    except ValueError:
        return str(root)


_ABSENT = "(absent)"


def config_differences(sweep: dict, run: dict) -> list[tuple[str, object, object]]:
    """Every key (sorted) where a run's config differs from the sweep's, but ADOPT_MAY_DIFFER."""
    a, b = _flat(sweep), _flat(run)
    key = "dataset.datamodule.root"
    if key in a and key in b:
        a[key + " (below data_root)"] = _below(a[key], sweep.get("data_root", ""))
        b[key + " (below data_root)"] = _below(b[key], run.get("data_root", ""))

    def free(k: str) -> bool:
        return any(k == f or k.startswith(f + ".") for f in ADOPT_MAY_DIFFER)

    return [(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in sorted(set(a) | set(b))
            if not free(k) and a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """A sweep's overrides -> each job's (Hydra's basic sweeper: ``a=1,2`` is two jobs)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:  # noqa: BLE001 - Hydra's grammar errors, one line
        raise EENetError(f"cannot parse the sweep's overrides: {first_line(exc)}") from exc
    lists: dict[str, list[str]] = {}
    for o in parsed:
        k = o.get_key_element()
        lists[k] = ([f"{k}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
                    else [f"{k}={o.get_value_element_as_str()}"])
    return [list(job) for job in itertools.product(*lists.values())]


class Table:
    """Sweeps, their folders, and the rows built from them.

    ``adopt``: runs trained by hand that stand for a sweep's jobs (``--adopt``); ``plan``: a
    first pass that trains, evaluates and writes nothing, only learns the table's sweep keys
    (``planned``) and checks the adopted runs against their sweeps (every sweep returns no job).
    """

    def __init__(self, name: str, out: Path, data: Path, smoke: bool, seeds: list[int],
                 cifar10: bool = False, cifar10_epochs: int | None = None,
                 adopt: dict[str, list[Adopted]] | None = None, plan: bool = False):
        self.name, self.out, self.data, self.smoke, self.seeds = name, out, data, smoke, seeds
        self.cifar10 = cifar10  # train the CIFAR-10 (JPEG) recipe rows (SMOKE: on tiny data)
        self.cifar10_epochs = cifar10_epochs
        self.adopt = adopt or {}
        self.plan = plan
        self.planned: list[str] = []  # every sweep key this table reached
        self.adopted: dict[str, list[Adopted]] = {}  # the adopted runs it used, by key
        self.sweeps: list[dict] = []
        self.commands: dict[str, str] = {}
        self.command_of: dict[str, str] = {}
        self.extra: dict = {}  # table-specific results for the JSON (e.g. chosen_on_val)

    def check_adopted(self, key: str, overrides: list[str]) -> list[Adopted]:
        """The adopted runs of ``key``, each checked to be one job of the sweep (its seed one of
        ``--seeds``, its config the sweep's but for ADOPT_MAY_DIFFER), one per job; in job order."""
        jobs = sweep_jobs(overrides)
        taken: dict[tuple[int, int], Adopted] = {}
        for a in self.adopt[key]:
            where = f"--adopt {key}={a.path}"
            if a.seed not in self.seeds:
                raise EENetError(f"{where}: its seed {a.seed} is not one of --seeds "
                                 f"{' '.join(str(s) for s in self.seeds)}")
            nearest = None
            for i, job in enumerate(jobs):
                try:
                    cfg = compose_config([*job, f"seed={a.seed}"], output_dir=str(a.path))
                    expected = OmegaConf.to_container(cfg, resolve=True)
                except EENetError:
                    raise
                except Exception as exc:  # noqa: BLE001 - Hydra's errors, one line
                    raise EENetError(f"{where}: cannot compose the sweep's config: "
                                     f"{first_line(exc)}") from exc
                diff = config_differences(expected, a.config)
                if not diff:
                    if (i, a.seed) in taken:
                        raise EENetError(f"{where}: the same job (seed {a.seed}) as "
                                         f"{taken[i, a.seed].path}; one run per job")
                    taken[i, a.seed] = a
                    break
                if nearest is None or len(diff) < len(nearest):
                    nearest = diff
            else:
                k, want, got = nearest[0]
                raise EENetError(f"{where}: not the run the sweep trains: {k} is {want!r} in the "
                                 f"sweep, {got!r} in the run ({len(nearest)} key(s) differ; only "
                                 f"{', '.join(ADOPT_MAY_DIFFER)} may)")
        return [taken[k] for k in sorted(taken)]

    def cifar_overrides(self, overrides: list[str]) -> list[str]:
        """A CIFAR-10 (JPEG) recipe sweep's overrides, with ``--cifar10-epochs`` when given."""
        epochs = [] if self.cifar10_epochs is None else [f"trainer.max_epochs={self.cifar10_epochs}"]
        return [*overrides, *epochs]

    def ckey(self, key: str) -> str:
        """A CIFAR-10 recipe sweep's folder name, with its epochs: runs of other budgets
        (``--cifar10-epochs``) go to folders of their own, never into a finished one."""
        epochs = self.cifar10_epochs if self.cifar10_epochs is not None else int(compose_config(
            [f"experiment={CIFAR_PLAIN[1]}"], output_dir="unused").trainer.max_epochs)
        return f"{key}_{epochs}ep"

    def cifar_epochs(self, experiment: str) -> int:
        """The epochs a CIFAR-10 recipe row trains for (its config's, or ``--cifar10-epochs``)."""
        if self.smoke:
            return 1
        if self.cifar10_epochs is not None:
            return self.cifar10_epochs
        return int(compose_config([f"experiment={experiment}"], output_dir="unused").trainer.max_epochs)

    def sweep(self, key: str, overrides: list[str], shared: bool = False,
              run: bool = True) -> list[Path]:
        """Run ``eenet-train -m <overrides>`` into ``<out>/runs/<table>/<key>``; the job folders.

        ``shared`` sweeps (the backbones without exits that several tables compare
        against) live in ``<out>/runs/shared/<key>`` and are trained once for all tables.
        ``run=False``: a sweep that already ran with the same command is read back; any
        other is recorded as not run (no job folders).
        """
        folder = self.out / "runs" / ("shared" if shared else self.name) / key
        job = [f"data_root={self.data}", "trainer.enable_progress_bar=false", "logger=csv",
               *overrides]  # every job's overrides, but its seed and SMOKE's
        smoke = SMOKE if self.smoke else []
        args = [*job, f"seed={','.join(str(s) for s in self.seeds)}", *smoke,
                f"hydra.sweep.dir={folder}"]
        cmd = [sys.executable, "-m", "eenet.cli.train", "-m", *args]
        self.commands[key] = "eenet-train -m " + shlex.join(args)
        self.planned.append(key)
        if key in self.adopt:  # runs trained by hand stand for the sweep's jobs (--adopt)
            runs = self.check_adopted(key, [*job, *smoke])
            if self.plan:
                return []
            self.adopted[key] = runs
            for a in runs:
                print(f"[{self.name}] {key}: {a.command}", flush=True)
                self.sweeps.append({"key": key, "command": a.command, "adopted": str(a.path),
                                    "seed": a.seed, "sweep_command": self.commands[key]})
                self.command_of[str(a.path)] = a.command
            return [a.path for a in runs]
        if self.plan:
            return []
        done = folder / ".done"
        if done.is_file() and done.read_text() == shlex.join(args):
            print(f"[{self.name}] reusing {folder}", flush=True)
            self.sweeps.append({"key": key, "command": self.commands[key], "reused": True})
        elif not run:
            print(f"[{self.name}] {NOT_RUN}: {key} (--cifar10 yes runs it)", flush=True)
            self.sweeps.append({"key": key, "command": self.commands[key], NOT_RUN: True})
            return []
        else:
            print(f"[{self.name}] eenet-train -m {' '.join(args)}", flush=True)
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env={**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")})
            if proc.returncode != 0:
                raise EENetError(f"sweep {key} failed: {proc.stderr.strip().splitlines()[-1:]}")
            self.sweeps.append({"key": key, "command": self.commands[key],
                                "wall_s": time.time() - t0})
            atomic_write_text(folder / "machine.json", json.dumps(machine_info(), indent=2) + "\n")
            atomic_write_text(done, shlex.join(args))
        jobs = sorted((p for p in folder.iterdir() if p.is_dir() and (p / "results.json").is_file()),
                      key=lambda p: int(p.name) if p.name.isdigit() else p.name)
        for job in jobs:
            self.command_of[str(job)] = self.commands[key]
        return jobs

    def evaluate(self, job: Path, policy: str, name: str | None = None, **target) -> dict:
        """Calibrate on val for the target, evaluate on test with the dynamic engine (into
        ``job/eval/<name>``, the policy's name by default)."""
        ov = [f"run={job}", f"policy={policy}", "batch_size=256", "overwrite=true"]
        ov += [f"{k}={v}" for k, v in target.items()]
        return evaluate(compose_config(ov, output_dir=job / "eval" / (name or policy),
                                       config_name="eval"))


def results(job: Path) -> dict:
    return json.loads((job / "results.json").read_text())


def machine_of(job: Path) -> str:
    """The machines a job ran on (:func:`eenet.reporting.results.trained_on`: its results.json,
    else a machine.json beside it), else its table sweep's (beside its jobs, in a folder with
    the sweep's ``.done``), else "not recorded"."""
    sweep = Path(job).parent
    return (trained_on(job) or (trained_on(sweep) if (sweep / ".done").is_file() else None)
            or "not recorded")


def row_facts(res: dict, job: Path | None = None) -> dict:
    cfg = res["config"]
    facts = {"seed": cfg["seed"], "epochs": res["epochs"], "wall_s": round(res.get("wall_s", 0), 1),
             "threads": cfg.get("threads")}
    precision = trained_precision(cfg)
    facts["precision"] = precision
    if job is not None:
        facts["machine"] = machine_of(job) + ("" if precision == "32-true"
                                              else f", trained in {precision}")
    return facts


def not_run_row(t: "Table", key: str, epochs: int, **labels) -> dict:
    """A row whose sweep has not run: its labels, the command that would make it, no number."""
    return {**labels, "status": NOT_RUN, "job": None, "command": t.commands[key],
            "seed": None, "epochs": None, "planned_seeds": list(t.seeds),
            "planned_epochs": epochs, "wall_s": None, "machine": "-"}


def lambdas_not_run(rows: list[dict], lambdas: list[str]) -> list[str]:
    """The swept lambdas (``"-"``: a method without one) that no row of ``rows`` has: a sweep
    whose jobs were adopted in part shows its other jobs "not run", not nothing."""
    ran = {r["lambda"] if r["lambda"] == "-" else float(r["lambda"]) for r in rows}
    return [lam for lam in lambdas if (lam if lam == "-" else float(lam)) not in ran]


def is_run(rs: list[dict]) -> bool:
    return not any(r.get("status") == NOT_RUN for r in rs)


def mean_sd(values: list[float], scale: float = 100.0) -> str:
    if len(values) == 1:
        return f"{scale * values[0]:.2f}"
    return f"{scale * statistics.mean(values):.2f} +- {scale * statistics.stdev(values):.2f}"


def group(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


# ---- the tables ---------------------------------------------------------------------------

def machines(rs: list[dict]) -> str:
    return "; ".join(sorted({str(r.get("machine", "not recorded")) for r in rs}))


def summary_cells(rs: list[dict]) -> list:
    """Seeds, accuracy (mean +- sd), cost, exit rates, anytime AUC, epochs, wall s, machine."""
    if not is_run(rs):
        return ["-", NOT_RUN, NOT_RUN, NOT_RUN, NOT_RUN, NOT_RUN, NOT_RUN, "-"]
    return [len(rs), mean_sd([r["accuracy"] for r in rs]),
            f"{statistics.mean(r['cost'] for r in rs):.3f}",
            " / ".join(f"{100 * statistics.mean(r['rates'][i] for r in rs):.1f}"
                       for i in range(len(rs[0]["rates"]))),
            "-" if rs[0]["auc"] is None else f"{statistics.mean(r['auc'] for r in rs):.4f}",
            rs[0]["epochs"], f"{sum(r['wall_s'] for r in rs):.0f}", machines(rs)]


#: the CIFAR-10 (JPEG) recipe runs every table shares (trained once, in runs/shared/)
CIFAR_PLAIN = ("cifar10_jpeg_recipe_resnet20", "cifar10_recipe/resnet20")
CIFAR_EENETS = ("cifar10_jpeg_recipe_resnet20_eenets", "cifar10_recipe/resnet20_eenets")
EENETS_PAPER = "similar accuracy at about 20% of the cost (abstract; all data sets)"
SDN_PAPER = "more than 50% cost cut at preserved accuracy (as issue 20 quotes SDN)"
#: the certified calibration beside the empirical one (eenet-eval guarantee=...; issue 18):
#: a test accuracy drop of at most 1 point against the method's own final exit, with
#: probability at least 0.9 over the val sample (Learn Then Test, Angelopoulos et al. 2021)
CERTIFIED = {"guarantee": "ltt", "risk": "drop", "alpha": 0.01, "delta": 0.1}


def certified_target(t: Table) -> dict:
    """CERTIFIED; under SMOKE alpha 0.1: a val split of 150 samples cannot certify 1 point
    (zero observed risk on n samples has p = (1 - alpha)^n, above delta until n >= 230)."""
    return {**CERTIFIED, "alpha": 0.1} if t.smoke else CERTIFIED


def certified_cell(rs: list[dict]) -> str:
    """The rows' certified test accuracy and cost (mean over seeds), '-' without one."""
    if not is_run(rs):
        return NOT_RUN
    if any("certified_accuracy" not in r for r in rs):
        return "-"
    cell = (f"{mean_sd([r['certified_accuracy'] for r in rs])} / "
            f"{statistics.mean(r['certified_cost'] for r in rs):.3f}")
    failed = sum(not r["certified"] for r in rs)
    return cell + (f" (not certified in {failed} of {len(rs)}: final exit)" if failed else "")


def cifar_lambdas(t: Table) -> str:
    return "0.5,1" if t.smoke else "0.25,0.5,1,2"


def cifar_plain(t: Table) -> list[Path]:
    key, exp = CIFAR_PLAIN
    return t.sweep(t.ckey(key), t.cifar_overrides([f"experiment={exp}"]), shared=True,
                   run=t.cifar10)


def cifar_eenets(t: Table) -> list[Path]:
    key, exp = CIFAR_EENETS
    return t.sweep(t.ckey(key), t.cifar_overrides([f"experiment={exp}",
                                           f"loss.second.lambda_coef={cifar_lambdas(t)}"]),
                   shared=True, run=t.cifar10)


def plain_row(ds: str, job: Path) -> dict:
    """The EENets table's row of a resnet20 trained without exits."""
    r = results(job)
    return {"dataset": ds, "model": "resnet20 (no exits)", "lambda": "-",
            "accuracy": r["test"]["accuracy"], "cost": 1.0, "rates": [1.0], "auc": None,
            "job": str(job), "paper": "-", **row_facts(r, job)}


def eenets_row(ds: str, job: Path, model: str) -> dict:
    """The EENets table's row of a jointly trained resnet20 with EENets exits."""
    r = results(job)
    return {"dataset": ds, "model": model, "job": str(job),
            "lambda": r["config"]["loss"]["second"]["lambda_coef"],
            "accuracy": r["test"]["accuracy"], "cost": r["test"]["avg_cost_fraction"],
            "rates": r["test"]["exit_rates"], "paper": EENETS_PAPER,
            "auc": r.get("anytime", {}).get("auc"), **row_facts(r, job)}


def table_eenets(t: Table, datasets: list[str]) -> tuple[str, list[dict], list[str]]:
    rows, deviations = [], [
        "MNIST rows: CPU budget of 5 epochs (EENets train far longer); one warm-up epoch of "
        "multi_ce, then eenet_v2.",
        "Confidence head: eenet's stats head (started at the max softmax probability, 10x "
        "learning rate); EENets' own feature head saturates under Adam and sends every sample "
        "to one exit (experiments/mnist_core/run.py compares both).",
        "Policy: confidence > 0.5, as in EENets; anytime AUC uses thresholds chosen on val."]
    for ds in datasets:
        if ds != "mnist":
            deviations.append(f"{ds}: " + ("CIFAR-10 stored as JPEG (a few points below the "
                                           "original pixels)." if ds == CIFAR else ""))
        plain = t.sweep(f"{ds}_plain", ["experiment=plain_mnist", f"dataset={ds}"], shared=True)
        lam = "0.5,1" if t.smoke else "0.25,0.5,1,2"
        ee = t.sweep(f"{ds}_eenets", ["experiment=eenets_mnist", f"dataset={ds}",
                                      f"loss.second.lambda_coef={lam}"])
        rows += [plain_row(ds, job) for job in plain]
        rows += [eenets_row(ds, job, "resnet20 + 2 EENets exits") for job in ee]
    # CIFAR-10 (JPEG) by the short recipe (issue 20): run with --cifar10, else read back or "not run"
    ds = f"{CIFAR} (recipe)"
    epochs = t.cifar_epochs(CIFAR_PLAIN[1])
    plain, ee = cifar_plain(t), cifar_eenets(t)
    rows += [plain_row(ds, job) for job in plain]
    if not plain:
        rows.append(not_run_row(t, t.ckey(CIFAR_PLAIN[0]), epochs, dataset=ds, paper="-",
                                model="resnet20 (no exits)", **{"lambda": "-"}))
    ee_rows = [eenets_row(ds, job, "resnet20 + 6 EENets exits") for job in ee]
    rows += ee_rows + [not_run_row(t, t.ckey(CIFAR_EENETS[0]), epochs, dataset=ds,
                                   paper=EENETS_PAPER, model="resnet20 + 6 EENets exits",
                                   **{"lambda": lam})
                       for lam in lambdas_not_run(ee_rows, cifar_lambdas(t).split(","))]
    deviations += [*CIFAR_DEVIATIONS,
                   "CIFAR-10 (JPEG) EENets rows: six exits placed as SDN's internal "
                   "classifiers (about 1/7 ... 6/7 of the MACs), each one 3x3 stride-2 conv "
                   "branch (the same exits as the baselines' SDN and BranchyNet rows); two "
                   "epochs of label-smoothed multi_ce, then eenet_v2; confidence > 0.5."]
    md = []
    for (ds, model, lam), rs in group(rows, ("dataset", "model", "lambda")).items():
        md.append([ds, model, lam, *summary_cells(rs), rs[0]["paper"]])
    table = markdown_table(["data set", "model", "lambda", "seeds", "test acc %",
                            "avg cost fraction", "exit rates %", "anytime AUC", "epochs",
                            "wall s", "machine", "paper"], md)
    return table, rows, deviations


def chosen_on_val(rows: list[dict], plain: dict[int, float]) -> list[dict]:
    """Per seed, the CIFAR-10 method whose thresholds reach the reference's val accuracy minus
    1 point at the lowest val cost (issue 20: the best method chosen on val)."""
    chosen = []
    for seed, ref in sorted(plain.items()):
        ok = [r for r in rows if r["seed"] == seed and r["val_accuracy"] >= ref - 0.01 - 1e-12]
        if ok:
            best = min(ok, key=lambda r: r["val_cost"])
            chosen.append({"seed": seed, "method": best["method"], "lambda": best["lambda"],
                           "val_accuracy": best["val_accuracy"], "val_cost": best["val_cost"],
                           "test_accuracy": best["accuracy"], "test_cost": best["cost"],
                           "reference_val_accuracy": ref})
    return chosen


def table_baselines(t: Table) -> tuple[str, list[dict], list[str]]:
    deviations = ["MNIST rows: the same resnet20, exits (plain pre-block, EENets' fine "
                  "placement) and recipe (Adam, cosine, 5 epochs) for every method, so they "
                  "compare on equal terms; thresholds of every method chosen on val for a "
                  "tolerance of 0.5 points below its own final exit.",
                  "Test with the dynamic engine at the thresholds chosen on val."]
    plain = t.sweep("mnist_plain", ["experiment=plain_mnist", "dataset=mnist"], shared=True)
    methods = [("BranchyNet (multi_ce + entropy)", "branchy", ["experiment=branchynet_mnist"], "entropy"),
               ("SDN (ramped weights + max_prob)", "sdn", ["experiment=sdn_mnist"], "max_prob"),
               ("EENets (eenet_v2 + confidence, stats head)", "eenets",
                ["experiment=eenets_mnist", "loss.second.lambda_coef=0.25"], "confidence")]
    rows = []
    for job in plain:
        r = results(job)
        rows.append({"dataset": "mnist", "method": "resnet20 (no exits)", "lambda": "-",
                     "accuracy": r["test"]["accuracy"], "cost": 1.0, "auc": None, "rates": [1.0],
                     "job": str(job), "paper": "-", **row_facts(r, job)})
    for label, key, ov, policy in methods:
        for job in t.sweep(key, ov):
            r = results(job)
            ev = t.evaluate(job, policy, tolerance=0.5)
            rows.append({"dataset": "mnist", "method": label, "accuracy": ev["test"]["accuracy"],
                         "lambda": r["config"]["loss"].get("second", {}).get("lambda_coef", "-"),
                         "cost": ev["test"]["avg_cost_fraction"], "rates": ev["test"]["exit_rates"],
                         "auc": r.get("anytime", {}).get("auc"), "job": str(job), "paper": "-",
                         "final_exit_accuracy": r["exits"][-1]["test_accuracy"], **row_facts(r, job)})
    # CIFAR-10 (JPEG) by the short recipe, every method on the same six exits; thresholds
    # chosen on val for the val accuracy of resnet20 without exits (same seed) minus 1 point
    ds = f"{CIFAR} (recipe)"
    epochs = t.cifar_epochs(CIFAR_PLAIN[1])
    cifar_ref = cifar_plain(t)
    ref_val = {results(j)["config"]["seed"]: results(j)["exits"][-1]["val_accuracy"]
               for j in cifar_ref}
    for job in cifar_ref:
        r = results(job)
        rows.append({"dataset": ds, "method": "resnet20 (no exits)", "lambda": "-",
                     "accuracy": r["test"]["accuracy"], "cost": 1.0, "auc": None, "rates": [1.0],
                     "job": str(job), "paper": "-", **row_facts(r, job)})
    if not cifar_ref:
        rows.append(not_run_row(t, t.ckey(CIFAR_PLAIN[0]), epochs, dataset=ds, method="resnet20 (no exits)",
                                paper="-", **{"lambda": "-"}))
    cifar_methods = [
        ("BranchyNet (multi_ce + entropy)", "entropy", "-",
         lambda: t.sweep(t.ckey("cifar10_jpeg_recipe_branchynet"), t.cifar_overrides(
             ["experiment=cifar10_recipe/resnet20_branchynet"]), run=t.cifar10),
         t.ckey("cifar10_jpeg_recipe_branchynet"), ["-"]),
        ("SDN (ramped weights + max_prob)", "max_prob", SDN_PAPER,
         lambda: t.sweep(t.ckey("cifar10_jpeg_recipe_sdn"), t.cifar_overrides(
             ["experiment=cifar10_recipe/resnet20_sdn"]), run=t.cifar10),
         t.ckey("cifar10_jpeg_recipe_sdn"), ["-"]),
        ("EENets (eenet_v2 + confidence, stats head)", "confidence", EENETS_PAPER,
         lambda: cifar_eenets(t), t.ckey(CIFAR_EENETS[0]), cifar_lambdas(t).split(","))]
    cifar_rows = []
    for label, policy, paper, run_sweep, key, lambdas in cifar_methods:
        jobs = run_sweep()
        method_rows = []
        for job in jobs:
            r = results(job)
            seed = r["config"]["seed"]
            # the reference's val accuracy minus 1 point; without a reference run, 1 point
            # below the method's own final exit
            target = ({"min_accuracy": ref_val[seed] - 0.01} if seed in ref_val
                      else {"tolerance": 1.0})
            ev = t.evaluate(job, policy, **target)
            cert = t.evaluate(job, policy, name=f"{policy}_certified", **certified_target(t))
            row = {"dataset": ds, "method": label, "job": str(job), "paper": paper,
                   "policy": policy, "certified_accuracy": cert["test"]["accuracy"],
                   "certified_cost": cert["test"]["avg_cost_fraction"],
                   "certified": bool(cert["calibration"]["guarantee"]["certified"]),
                   "lambda": r["config"]["loss"].get("second", {}).get("lambda_coef", "-"),
                   "accuracy": ev["test"]["accuracy"], "cost": ev["test"]["avg_cost_fraction"],
                   "val_accuracy": ev["val"]["accuracy"], "val_cost": ev["val"]["avg_cost_fraction"],
                   "rates": ev["test"]["exit_rates"], "auc": r.get("anytime", {}).get("auc"),
                   "target": target, "final_exit_accuracy": r["exits"][-1]["test_accuracy"],
                   **row_facts(r, job)}
            rows.append(row)
            cifar_rows.append(row)
            method_rows.append(row)
        rows += [not_run_row(t, key, epochs, dataset=ds, method=label, paper=paper,
                             **{"lambda": lam}) for lam in lambdas_not_run(method_rows, lambdas)]
    t.extra["chosen_on_val"] = chosen_on_val(cifar_rows, ref_val)
    deviations += [*CIFAR_DEVIATIONS,
                   "CIFAR-10 (JPEG) rows: six exits placed as SDN's internal classifiers (about "
                   "1/7 ... 6/7 of the MACs), each one 3x3 stride-2 conv branch, for every "
                   "method; thresholds chosen on val for "
                   "the val accuracy of resnet20 without exits (same seed) minus 1 point, and "
                   "the method chosen on val as the lowest val cost that reaches it.",
                   "CIFAR-10 (JPEG) rows, certified column: thresholds certified on val by "
                   "eenet-eval guarantee=ltt risk=drop alpha=0.01 delta=0.1 (a test drop of at "
                   "most 1 point against the method's own final exit with probability >= 0.9), "
                   "test accuracy / cost; beside the empirical choice, not used to choose"
                   + (" (SMOKE: alpha=0.1, the tiny val split cannot certify 1 point)."
                      if t.smoke else ".")]
    md = []
    for (ds, method, lam), rs in group(rows, ("dataset", "method", "lambda")).items():
        md.append([ds, method, lam, *summary_cells(rs), certified_cell(rs), rs[0]["paper"]])
    table = markdown_table(["data set", "method", "lambda", "seeds", "test acc %",
                            "avg cost fraction", "exit rates %", "anytime AUC", "epochs",
                            "wall s", "machine", "certified: test acc % / cost", "paper"], md)
    chosen = t.extra["chosen_on_val"]
    table += "\n\nCIFAR-10 (JPEG), method chosen on val: " + (
        "; ".join(f"seed {c['seed']}: {c['method']} (lambda {c['lambda']}), test "
                  f"{100 * c['test_accuracy']:.2f}% at cost {c['test_cost']:.3f}" for c in chosen)
        if chosen else NOT_RUN + " (no run reaches the reference's val accuracy minus 1 point, "
        "or the runs are missing)")
    return table, rows, deviations


def table_pteenet(t: Table, backbones: list[str]) -> tuple[str, list[dict], list[str]]:
    deviations = ["CIFAR-10 stored as JPEG (a few points below the original pixels); SVHN is "
                  "not available here.",
                  "CPU budget: backbones 30 epochs, branches 8 (1 of multi_ce, then eenet_v2).",
                  "Thresholds on the branches' confidence heads chosen on val for a tolerance "
                  "of 1 point below the backbone; test with the dynamic engine."]
    rows = []
    epochs = 1 if t.smoke else 30
    for bb in backbones:
        plain = t.sweep(f"{bb}_backbone", [f"backbone={bb}", "dataset=cifar10_jpeg",
                                           "placement.method=explicit", "placement.stages=[]",
                                           "loss=multi_ce", f"trainer.max_epochs={epochs}"])
        for job in plain:
            r = results(job)
            rows.append({"backbone": bb, "model": "backbone", "lambda": "-", "job": str(job),
                         "accuracy": r["test"]["accuracy"], "cost": 1.0, **row_facts(r)})
            lam = "1" if t.smoke else "0.5,1,2"
            short = {"resnet20": "resnet20", "cifar_vgg16_bn": "vgg16",
                     "cifar_densenet40": "densenet40"}.get(bb)
            exp = [f"experiment=pteenet_{short}_cifar10"] if short else [
                "exit=pteenet", "mode=posttrain", "loss=two_stage", "dataset=cifar10_jpeg",
                "placement.method=linear", "placement.num_exits=3", f"backbone={bb}"]
            post = t.sweep(f"{bb}_post_seed{r['config']['seed']}",
                           exp + [f"backbone.checkpoint={job}", f"loss.second.lambda_coef={lam}"])
            for pj in post:
                pr = results(pj)
                ev = t.evaluate(pj, "confidence", tolerance=1.0)
                rows.append({"backbone": bb, "model": "PTEENet branches",
                             "lambda": pr["config"]["loss"]["second"]["lambda_coef"],
                             "accuracy": ev["test"]["accuracy"], "job": str(pj),
                             "cost": ev["test"]["avg_cost_fraction"],
                             "hash_unchanged": pr["backbone_hash_before"] == pr["backbone_hash_after"],
                             **row_facts(pr)})
    md = []
    for (bb, model, lam), rs in group(rows, ("backbone", "model", "lambda")).items():
        md.append([bb, model, lam, len(rs), mean_sd([r["accuracy"] for r in rs]),
                   f"{statistics.mean(r['cost'] for r in rs):.3f}",
                   "-" if "hash_unchanged" not in rs[0] else str(all(r["hash_unchanged"] for r in rs)),
                   rs[0]["epochs"], f"{sum(r['wall_s'] for r in rs):.0f}"])
    table = markdown_table(["backbone", "model", "lambda", "seeds", "test acc %",
                            "avg cost fraction", "backbone unchanged", "epochs", "wall s"], md)
    return table, rows, deviations


TRECX_PAPER = "FLOPs cut about 22% at <= 1 point (the issue's reading of the paper's ResNet-8)"


def table_trecx(t: Table) -> tuple[str, list[dict], list[str]]:
    deviations = ["ResNet-8 on CIFAR-10 (JPEG) by the short recipe (the row's epochs; MLPerf Tiny "
                  "trains ResNet-8 for 500): run with --cifar10.",
                  "Exits as the paper's code builds them (conf/experiment/trecx_*.yaml; their cost "
                  "fractions against the paper's: experiments/trecx_paper_exits/run.json); the "
                  "mitigation's depthwise filters stay tied to the exit's and its features are "
                  "globally pooled (the paper copies the filters for most of training and "
                  "flattens a small grid).",
                  "Keyword spotting on the 1,000-clip Speech Commands subset only (small data).",
                  "Visual Wake Words is not available here (its row runs where the data is).",
                  "FLOPs = fvcore MACs (one multiply-add = one flop), the exit head included; the "
                  "reduction is measured at thresholds chosen on val so that val accuracy stays "
                  "within 1 point of the model without exits.",
                  *CIFAR_DEVIATIONS]
    # (label, plain sweep overrides, T-RecX sweep overrides, runs now?, shared plain key, paper)
    settings = [("resnet8 / CIFAR-10 (JPEG)", ["experiment=cifar10_recipe/resnet8"],
                 ["experiment=cifar10_recipe/trecx_resnet8"], t.cifar10,
                 t.ckey("cifar10_jpeg_recipe_resnet8"), TRECX_PAPER),
                ("DS-CNN / KWS subset", ["experiment=trecx_dscnn_kws", "placement.stages=[]",
                                         "loss=multi_ce", "loss.weights=null"],
                 ["experiment=trecx_dscnn_kws"], True, None, "-")]
    if (t.data / "vww").is_dir():
        settings.append(("MobileNetV1 / VWW", ["experiment=trecx_mobilenet_vww",
                                               "placement.stages=[]", "loss=multi_ce",
                                               "loss.weights=null"],
                         ["experiment=trecx_mobilenet_vww"], True, None, "-"))
    rows = []
    for label, plain_ov, ee_ov, run, shared_key, paper in settings:
        cifar = shared_key is not None
        key = shared_key or ee_ov[0].removeprefix("experiment=trecx_") + "_plain"
        ee_key = (shared_key.replace("resnet8", "trecx_resnet8") if cifar
                  else ee_ov[0].removeprefix("experiment=trecx_") + "_ee")
        extend = t.cifar_overrides if cifar else list
        plain = t.sweep(key, extend(plain_ov), shared=cifar, run=run)
        ee = t.sweep(ee_key, extend([*ee_ov, "mitigation=null,trecx"]), run=run)
        epochs = t.cifar_epochs(ee_ov[0].removeprefix("experiment=")) if cifar else None
        plain_results = [results(j) for j in plain]  # each results.json read once
        plain_val = {r["config"]["seed"]: r["exits"][-1]["val_accuracy"] for r in plain_results}
        plain_test = {r["config"]["seed"]: r["test"]["accuracy"] for r in plain_results}
        for job, r in zip(plain, plain_results):
            rows.append({"setting": label, "model": "no exits", "job": str(job), "paper": "-",
                         "final_accuracy": r["test"]["accuracy"], "accuracy": r["test"]["accuracy"],
                         "macs": r["backbone_macs"], "reduction": 0.0, **row_facts(r, job)})
        if not plain:
            rows.append(not_run_row(t, key, epochs, setting=label, model="no exits", paper="-"))
        for job in ee:
            r = results(job)
            seed = r["config"]["seed"]
            target = ({"min_accuracy": plain_val[seed] - 0.01} if seed in plain_val
                      else {"tolerance": 1.0})
            ev = t.evaluate(job, "max_prob", **target)
            rows.append({"setting": label, "job": str(job), "paper": paper, "target": target,
                         "model": "T-RecX" + (" + mitigation" if r["config"]["mitigation"] else ""),
                         "final_accuracy": r["exits"][-1]["test_accuracy"],
                         "accuracy": ev["test"]["accuracy"], "macs": r["exits"][-1]["macs"],
                         "reduction": 1 - ev["test"]["avg_cost_fraction"],
                         # points below the same seed's model without exits, on test (the
                         # thresholds aimed at 1 point on val; this says whether it held)
                         "below_plain": (plain_test[seed] - ev["test"]["accuracy"]
                                         if seed in plain_test else None),
                         "val_target_reached": bool(ev["calibration"]["reachable"]),
                         **row_facts(r, job)})
        if not ee:
            rows += [not_run_row(t, ee_key, epochs, setting=label, model=m, paper=paper)
                     for m in ("T-RecX", "T-RecX + mitigation")]
    md = []
    for (setting, model), rs in group(rows, ("setting", "model")).items():
        if not is_run(rs):
            md.append([setting, model, "-", NOT_RUN, NOT_RUN, NOT_RUN, NOT_RUN, NOT_RUN,
                       NOT_RUN, NOT_RUN, "-", rs[0]["paper"]])
            continue
        below = [r.get("below_plain") for r in rs]
        missed = sum(1 for r in rs if r.get("val_target_reached") is False)
        md.append([setting, model, len(rs), mean_sd([r["final_accuracy"] for r in rs]),
                   f"{rs[0]['macs'] / 1e6:.2f}", mean_sd([r["accuracy"] for r in rs]),
                   f"{100 * statistics.mean(r['reduction'] for r in rs):.1f}%",
                   ("-" if None in below else  # no exits, or no same-seed reference
                    f"{100 * statistics.mean(below):.2f}"
                    + (f" ({missed} of {len(rs)} seeds: val target not reached)" if missed else "")),
                   rs[0]["epochs"], f"{sum(r['wall_s'] for r in rs):.0f}", machines(rs),
                   rs[0]["paper"]])
    table = markdown_table(["model / data", "network", "seeds", "final exit acc %",
                            "MACs (M, all exits)", "calibrated acc %", "FLOPs reduction",
                            "points below no exits (test)", "epochs", "wall s", "machine",
                            "paper"], md)
    return table, rows, deviations


def out_root_of(args) -> Path:
    return Path(args.out) if args.out else (
        REPO / "experiments" / "results" / ("smoke" if args.smoke else ""))


def make_table(name: str, args, adopt: dict[str, list[Adopted]] | None = None,
               plan: bool = False) -> Table:
    # absolute, so that make's --data ../shared/data and the default name one folder the same
    # way: a sweep is found again (.done) only by the same command
    return Table(name, out_root_of(args), Path(os.path.abspath(args.data)), args.smoke, args.seeds,
                 cifar10={"yes": True, "no": False, "auto": args.smoke}[args.cifar10],
                 cifar10_epochs=args.cifar10_epochs, adopt=adopt, plan=plan)


def fill(t: Table, args) -> tuple[str, list[dict], list[str]]:
    """The table's markdown, rows and deviations (sweeps run, read back, adopted or planned)."""
    name = t.name
    if name == "eenets":
        datasets = ["mnist"] if args.smoke else args.datasets
        table, rows, dev = table_eenets(t, datasets)
    elif name == "baselines":
        table, rows, dev = table_baselines(t)
    elif name == "pteenet":
        table, rows, dev = table_pteenet(t, ["resnet20"] if args.smoke else args.backbones)
    elif name == "trecx":
        table, rows, dev = table_trecx(t)
    else:
        raise EENetError(f"unknown table '{name}'; accepted: {', '.join(TABLES)}, all")
    return table, rows, dev


def plan_adopted(names, args, adopt: dict[str, list[Adopted]]) -> None:
    """Before anything is trained or written: every adopted key is a sweep of one of the tables,
    and every adopted run is one of its jobs (a first pass over the tables that trains nothing)."""
    if not adopt:
        return
    keys: set[str] = set()
    for name in names:
        t = make_table(name, args, adopt, plan=True)
        fill(t, args)
        keys.update(t.planned)
    unknown = sorted(set(adopt) - keys)
    if unknown:
        raise EENetError(f"--adopt: no sweep '{unknown[0]}' in {', '.join(names)}; accepted keys: "
                         f"{', '.join(sorted(keys))}")


def build(name: str, args, adopt: dict[str, list[Adopted]] | None = None) -> Path:
    out_root = out_root_of(args)
    t = make_table(name, args, adopt)
    t0 = time.time()
    started = git_revision(__file__)  # the code this table starts with (commits may land before it ends)
    table, rows, dev = fill(t, args)
    missed = [k for k in t.adopt if k in t.planned and k not in t.adopted]
    if missed:  # a sweep the first pass reached but this one did not: no table from half of it
        raise EENetError(f"--adopt {missed[0]}: its sweep was not reached; no table written")
    wall = time.time() - t0
    for r in rows:  # a row not run carries the command that would make it
        r.setdefault("command", t.command_of.get(r["job"], ""))
    adopted_jobs = {str(a.path) for runs in t.adopted.values() for a in runs}
    for r in rows:
        if r.get("job") in adopted_jobs:
            r["adopted"] = True
    not_run = [r for r in rows if r.get("status") == NOT_RUN]
    commands = {c for k, c in t.commands.items() if k not in t.adopted} | {
        a.command for runs in t.adopted.values() for a in runs}
    text = "\n".join([f"# Table: {name}{' (SMOKE: tiny data, 1 epoch; not results)' if args.smoke else ''}",
                      "", table, "", f"Paper: {PAPER[name]}", "", "Deviations:",
                      *[f"- {d}" for d in dev], "",
                      *([f"{len(not_run)} rows {NOT_RUN}: their sweeps have not run here "
                         "(CIFAR-10 (JPEG): --cifar10 yes, or CIFAR10=1 to make); the "
                         "commands below make them.", ""] if not_run else []),
                      *(["Adopted runs (trained outside this table, --adopt; each checked to be "
                         "its sweep's job but for " + ", ".join(ADOPT_MAY_DIFFER) + "):",
                         *[f"- {k} -> {a.path} (seed {a.seed}, threads {a.threads})"
                           for k, runs in t.adopted.items() for a in runs], ""]
                        if t.adopted else []),
                      f"Seeds {args.seeds}; wall time {wall:.0f} s on {machine_info()['cpu']} "
                      f"({machine_info()['cpu_count']} cores). Commands:",
                      *sorted({f"    {c}" for c in commands}), ""])
    md = out_root / f"{name}.md"
    atomic_write_text(md, text)
    atomic_write_text(out_root / f"{name}.json", json.dumps(
        {"table": name, "smoke": args.smoke, "markdown": table, "rows": rows, "paper": PAPER[name],
         "deviations": dev, "sweeps": t.sweeps, "wall_s": wall, **t.extra,
         **provenance(__file__, args.seeds, CHOSEN_ON[name], started), "machine": machine_info()},
        indent=2, default=str) + "\n")
    print(text, flush=True)
    return md


TABLES = ("eenets", "baselines", "pteenet", "trecx")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python experiments/tables.py", description=__doc__.splitlines()[0])
    p.add_argument("table", help=f"one of {', '.join(TABLES)}, or all")
    p.add_argument("--smoke", action="store_true", default=os.environ.get("SMOKE") == "1")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", default=None, help="folder for the tables and their runs "
                   "(default experiments/results, or experiments/results/smoke)")
    p.add_argument("--datasets", nargs="+", default=["mnist"],
                   help="eenets table: data sets (mnist, cifar10_jpeg, svhn, ...)")
    p.add_argument("--backbones", nargs="+", default=["resnet20"],
                   help="pteenet table: resnet20, cifar_vgg16_bn, cifar_densenet40")
    env = {"1": "yes", "0": "no"}.get(os.environ.get("CIFAR10", ""), "auto")
    p.add_argument("--cifar10", choices=("auto", "yes", "no"), default=env,
                   help="train the CIFAR-10 (JPEG) recipe rows: yes (CPU hours), no, or auto "
                        "(only with --smoke); rows not trained are read back from an earlier "
                        "run with the same command or shown as 'not run' (env CIFAR10=1 / 0)")
    p.add_argument("--cifar10-epochs", type=int, default=None,
                   help="epochs of the CIFAR-10 (JPEG) recipe rows (default: the recipe's "
                        "own, trainer.max_epochs of its config)")
    p.add_argument("--adopt", action="extend", nargs="+", default=[], metavar="KEY=RUN",
                   help="a finished eenet-train run folder that stands for one job of the sweep "
                        "KEY (as the table prints it: 'not run: KEY'), checked to be that job "
                        "(config but where-and-how keys, seed in --seeds); repeat for each seed")
    args = p.parse_args(argv)
    names = TABLES if args.table == "all" else (args.table,)
    try:
        if args.table != "all" and args.table not in TABLES:
            raise EENetError(f"unknown table '{args.table}'; accepted: {', '.join(TABLES)}, all")
        adopt = read_adopted(args.adopt)
        plan_adopted(names, args, adopt)  # before anything is trained or written
        for name in names:
            build(name, args, adopt)
    except EENetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
