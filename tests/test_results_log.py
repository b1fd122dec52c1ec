"""Provenance of experiment reports, and experiments/README.md's results regenerated from the JSONs.

A report saved by ``save_report`` carries the git revision of the code that made
it (checked against a repository this test makes itself, so the expected commit
does not come from the code under test), and says why when there is none.
"""

from __future__ import annotations

import json
import os
import subprocess
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
