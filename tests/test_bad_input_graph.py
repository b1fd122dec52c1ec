"""Bad options of the graph backbones (torchvision, timm, graph): one line, exit code 2, nothing written.

``backbone.exits_at`` (node names) and ``backbone.tokens`` (how exits on token
sequences pool) are checked by :func:`eenet.config_checks.check_train_config`,
before the data set is read and before anything is written: the type of
``exits_at``, each name against the model's traced graph (nearest names
suggested), ``tokens`` against the accepted pools. The rows go through the real
entry point (``run_job(train, cfg)``), as ``tests/test_bad_input.py`` does.
"""

from __future__ import annotations

import pytest

from eenet.cli.common import run_job
from eenet.config import compose_config
from eenet.config_checks import check_train_config
from eenet.jobs.train import train
from eenet.models.graph_split import TOKEN_POOLS
from folder_state import snapshot  # tests/ is on sys.path

QUICK = ["trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=none"]
# timm builds a 1-channel resnet18 for the bundled digits; torchvision's models read RGB
TIMM = ["backbone=timm", "backbone.name=resnet18"]
TORCHVISION = ["backbone=torchvision", "backbone.name=resnet18", "backbone.in_chans=3"]
# a model of the user's own, named on the command line
GRAPH = ["backbone=graph", "backbone.model._target_=torchvision.models.resnet18",
         "+backbone.model.num_classes=10"]

ROWS = [
    ("exits_at a string", [*TIMM, "backbone.exits_at=layer1"],
     "backbone.exits_at='layer1' must be a list of node names"),
    ("exits_at numbers", [*TIMM, "backbone.exits_at=[1,2]"],
     "backbone.exits_at=[1, 2] must be a list of node names"),
    ("exits_at an empty name", [*TIMM, "backbone.exits_at=['']"],
     "must be a list of node names"),
    ("unknown node, timm", [*TIMM, "backbone.exits_at=[layer1,layer9]"],
     "backbone.exits_at: node 'layer9' is not in the traced graph of ResNet; nearest names: layer4"),
    ("unknown node, torchvision", [*TORCHVISION, "backbone.exits_at=[layer2.3]"],
     "backbone.exits_at: node 'layer2.3' is not in the traced graph of ResNet; nearest names: layer2.1"),
    ("unknown node, own model", [*GRAPH, "backbone.exits_at=[layers3]"],
     "backbone.exits_at: node 'layers3' is not in the traced graph of ResNet; nearest names: layer3"),
    ("exits_at beside placement.stages", [*TIMM, "backbone.exits_at=[layer1]",
                                         "placement.method=explicit", "placement.stages=[0]"],
     "backbone.exits_at=['layer1'] places the exits, placement.stages=[0] would not be read"),
    ("unknown token pool, timm", [*TIMM, "backbone.tokens=first"],
     "unknown backbone.tokens 'first'; accepted: mean, cls"),
    ("unknown token pool, torchvision", [*TORCHVISION, "backbone.tokens=avg"],
     "unknown backbone.tokens 'avg'; accepted: mean, cls"),
    ("token pool not a name", [*GRAPH, "backbone.tokens=1"], "unknown backbone.tokens 1"),
]


@pytest.mark.parametrize("name,overrides,message", ROWS, ids=[r[0] for r in ROWS])
def test_graph_backbone_rows(tmp_path, capsys, monkeypatch, name, overrides, message):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": true}\n')  # an earlier run stays as it was
    before = snapshot(tmp_path)
    cfg = compose_config(QUICK + overrides, output_dir=out)
    with pytest.raises(SystemExit) as code:
        run_job(train, cfg)
    assert code.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert message in err[0], err[0]
    assert snapshot(tmp_path) == before


def test_unknown_node_is_reported_before_the_data_is_read(tmp_path, capsys, monkeypatch):
    """The names are checked on the bare model: a data root without CIFAR-10's files would
    fail when the data is read, but the node's line comes first."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    (tmp_path / "data").mkdir()
    cfg = compose_config(QUICK + ["dataset=cifar10_jpeg", f"data_root={tmp_path / 'data'}",
                                  "backbone=torchvision", "backbone.exits_at=[layer9]"],
                         output_dir=tmp_path / "run")
    with pytest.raises(SystemExit):
        run_job(train, cfg)
    err = capsys.readouterr().err
    assert "node 'layer9' is not in the traced graph" in err, err
    # the same config with existing nodes gets past the checks and fails on the data instead
    ok = compose_config(QUICK + ["dataset=cifar10_jpeg", f"data_root={tmp_path / 'data'}",
                                 "backbone=torchvision", "backbone.exits_at=[layer1,layer3]"],
                        output_dir=tmp_path / "run2")
    with pytest.raises(SystemExit):
        run_job(train, ok)
    err = capsys.readouterr().err
    assert "traced graph" not in err and "missing train/, test/" in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()


@pytest.mark.parametrize("overrides", [
    [*TIMM, "backbone.exits_at=[layer1,layer3]"],
    [*TORCHVISION, "backbone.exits_at=[layer1,layer2.1,layer3]"],
    [*GRAPH, "backbone.exits_at=[layer2]"],
    [*TIMM, "backbone.exits_at=null"],
    *[[*TIMM, f"backbone.tokens={pool}"] for pool in TOKEN_POOLS],
], ids=["timm", "torchvision", "own model", "placed by MACs", *TOKEN_POOLS])
def test_accepted_options_pass(overrides):
    check_train_config(compose_config(QUICK + overrides, output_dir="unused"))


def test_pretrained_names_are_checked_without_fetching_weights():
    """The names do not depend on the weights: the check builds the bare architecture, so an
    offline machine (or a slow download) does not stand in the way of a name check."""
    cfg = compose_config(QUICK + [*TORCHVISION, "backbone.pretrained=true", "dataset.num_classes=1000",
                                  "backbone.exits_at=[layer1,layer9]"], output_dir="unused")
    with pytest.raises(Exception) as err:
        check_train_config(cfg)
    assert "node 'layer9' is not in the traced graph" in str(err.value)
