"""The README's Python examples run as they are written (on the bundled digits, in tmp_path).

The examples write their run folders under ``outputs/`` relative to the current
folder; the test runs them from ``tmp_path``, so nothing is written into the
repository. The first example trains its own run folder before ``load_run``
reads it, so no fixture run is substituted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.S | re.M)


def test_the_readme_has_the_two_python_examples():
    assert len(BLOCKS) == 2
    assert "load_run(" in BLOCKS[0] and "for epoch in range(" in BLOCKS[1]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = compile(BLOCKS[index], f"README.md python block {index}", "exec")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: one thread is faster on a shared 2-core machine
    try:
        exec(code, {"__name__": f"readme_block_{index}"})
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    if index == 0:
        run = tmp_path / "outputs" / "python_demo"
        assert (run / "model.pt").is_file()
        report = json.loads((run / "eval" / "results.json").read_text())
        assert report["calibration"]["message"] in printed
        assert re.search(r"exits taken \[\d+, \d+, \d+\], average cost \d\.\d{3}", printed)
    else:
        manifest = json.loads((tmp_path / "outputs" / "onnx" / "manifest.json").read_text())
        assert manifest  # the ONNX pieces were written with their manifest
        assert re.search(r"test accuracy \d\.\d{3} at cost \d\.\d{3}", printed)
