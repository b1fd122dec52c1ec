"""Provenance of experiment reports, and experiments/README.md's results regenerated from the JSONs.

A report saved by ``save_report`` carries the git revision of the code that made
it (checked against a repository this test makes itself, so the expected commit
does not come from the code under test), and says why when there is none.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eenet.reporting.experiment import git_revision, save_report


def _git(repo: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
                           "-c", "commit.gpgsign=false", *args], check=True, capture_output=True,
                          text=True, env=env).stdout


@pytest.fixture()
def repo(tmp_path: Path) -> tuple[Path, str]:
    """A git repository with one commit holding ``exp/run.py``; its commit id."""
    root = tmp_path / "repo"
    (root / "exp").mkdir(parents=True)
    (root / "exp" / "run.py").write_text("print('experiment')\n")
    _git(root, "init", "-q")
    _git(root, "add", "exp/run.py")
    _git(root, "commit", "-q", "-m", "one")
    # the commit id read from git's own files, not through the code under test
    head = (root / ".git" / "HEAD").read_text().split()[-1]
    commit = (root / ".git" / head).read_text().strip()
    return root, commit


def test_report_carries_revision_seeds_and_choice(repo):
    root, commit = repo
    script = root / "exp" / "run.py"
    out = save_report(str(script), {"figure": 1.0}, seeds=[0, 1],
                      chosen_on={"thresholds": "val", "lambda": "test"})
    report = json.loads(out.read_text())
    assert out == script.with_suffix(".json")
    assert report["revision"]["commit"] == commit
    assert report["revision"]["dirty"] is False and report["revision"]["changed"] == []
    assert report["seeds"] == [0, 1]
    assert report["chosen_on"] == {"thresholds": "val", "lambda": "test"}
    assert report["figure"] == 1.0

    # a changed tracked file makes the tree dirty, and is named
    script.write_text("print('changed')\n")
    report = json.loads(save_report(str(script), {}).read_text())
    assert report["revision"]["commit"] == commit and report["revision"]["dirty"] is True
    assert " M exp/run.py" in report["revision"]["changed"]
    assert report["seeds"] is None and report["chosen_on"] is None  # not given: says so


def test_revision_taken_at_start_names_the_commit_at_save(repo):
    root, first = repo
    started = git_revision(root / "exp" / "run.py")
    (root / "exp" / "more.py").write_text("x = 1\n")
    _git(root, "add", "exp/more.py")
    _git(root, "commit", "-q", "-m", "two")
    report = json.loads(save_report(str(root / "exp" / "run.py"), {}, revision=started).read_text())
    assert report["revision"]["commit"] == first
    second = _git(root, "rev-parse", "HEAD").strip()
    assert second != first and report["revision"]["commit_at_save"] == second


def test_no_checkout_records_null_and_why(tmp_path):
    report = json.loads(save_report(str(tmp_path / "run.py"), {}).read_text())
    rev = report["revision"]
    assert rev["commit"] is None and rev["dirty"] is None
    assert "not a git repository" in rev["note"]


def test_no_git_records_null_and_why(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git command on PATH
    rev = git_revision(tmp_path)
    assert rev["commit"] is None and "git is not installed" in rev["note"]


def test_report_refuses_unknown_choice_and_reserved_keys(tmp_path):
    with pytest.raises(ValueError, match="chosen_on values must be one of"):
        save_report(str(tmp_path / "run.py"), {}, chosen_on={"lambda": "best"})
    with pytest.raises(ValueError, match="written by save_report itself"):
        save_report(str(tmp_path / "run.py"), {"revision": "x"})
    assert not list(tmp_path.iterdir())  # nothing written before the checks


# --- experiments/README.md against the JSONs ------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
SCRIPT = EXPERIMENTS / "results_log.py"


def _results_log():
    import importlib.util

    spec = importlib.util.spec_from_file_location("results_log", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


results_log = _results_log()


def _copy(tmp_path: Path) -> Path:
    """experiments/README.md and every result JSON, in their layout, under tmp_path."""
    root = tmp_path / "experiments"
    for rel in ["README.md", *results_log.found_jsons(EXPERIMENTS)]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes((EXPERIMENTS / rel).read_bytes())
    return root


def _check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--check", "--root", str(root)],
                          capture_output=True, text=True, timeout=120)


def test_committed_readme_is_what_the_jsons_give():
    diff = results_log.check(EXPERIMENTS)
    assert diff is None, diff


def test_check_fails_when_a_json_figure_changes(tmp_path):
    root = _copy(tmp_path)
    assert _check(root).returncode == 0  # the copy alone passes: the failure below is the edit's
    rel = root / "pteenet" / "results" / "every_stage_kd_cv.json"
    doc = json.loads(rel.read_text())
    chosen = doc["chosen_on_val"]
    entry = next(e for e in doc["sweep"] if e["lambda"] == chosen["lambda"])
    assert f"{100 * entry['test_accuracy']:.2f}" in (root / "README.md").read_text()
    entry["test_accuracy"] += 0.0075  # 0.75 points: a figure the README quotes to 2 decimals
    rel.write_text(json.dumps(doc, indent=2) + "\n")
    proc = _check(root)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "differs from its JSONs" in lines[0]
    assert "Traceback" not in proc.stderr


def test_check_fails_when_a_quoted_figure_is_edited_by_hand(tmp_path):
    root = _copy(tmp_path)
    readme = root / "README.md"
    text = readme.read_text()
    kd_cv = json.loads((root / "pteenet" / "results" / "every_stage_kd_cv.json").read_text())
    best = max(kd_cv["sweep"], key=lambda e: e["test_accuracy"])  # a test-chosen figure
    val = kd_cv["chosen_on_val"]
    old, new = f"{100 * val['test_accuracy']:.2f}", f"{100 * best['test_accuracy']:.2f}"
    assert old != new and old in text
    readme.write_text(text.replace(old, new, 1))
    proc = _check(root)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1


def test_a_missing_block_or_json_is_one_line_exit_2(tmp_path):
    root = _copy(tmp_path)
    readme = root / "README.md"
    readme.write_text(readme.read_text().replace("<!-- /results:pteenet -->", ""))
    proc = _check(root)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "results:pteenet" in proc.stderr

    root = _copy(tmp_path / "again")
    (root / "mnist_budget" / "results.json").unlink()
    proc = _check(root)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "results.json" in proc.stderr


def test_log_rule_reproduces_the_recorded_choice_on_val():
    """results_log applies run.py's rule to JSONs without chosen_on_val; on the JSONs that
    record one, the rule with the record removed must pick the recorded entry."""
    recorded = 0
    for path in sorted((EXPERIMENTS / "pteenet" / "results").glob("*.json")):
        doc = json.loads(path.read_text())
        if not doc.get("chosen_on_val"):
            continue
        index, how = results_log.lambda_on_val(doc)
        assert how == "recorded"
        rec = doc["chosen_on_val"]
        entry = doc["sweep"][index]
        assert (entry["lambda"], entry["policy"], entry["test_accuracy"]) == (
            rec["lambda"], rec["policy"], rec["test_accuracy"])
        del doc["chosen_on_val"]
        again, how = results_log.lambda_on_val(doc)
        assert again == index, path.name
        recorded += 1
    assert recorded >= 3  # every_stage_{multice,ce,kd}_cv and the seed-1 run record one


def test_every_json_is_in_the_log_with_its_revision():
    text = (EXPERIMENTS / "README.md").read_text()
    block = text.split("<!-- results:provenance -->", 1)[1].split("<!-- /results:provenance -->")[0]
    for rel in results_log.found_jsons(EXPERIMENTS):
        doc = json.loads((EXPERIMENTS / rel).read_text())
        assert f"[{rel}]({rel})" in block
        assert doc.get("revision") or doc.get("revision_note"), f"{rel} carries no revision"
