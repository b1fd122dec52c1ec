"""Which graph builders a run folder may name (issue 17): a run folder's config may name the
torchvision / timm / graph builders, never the user's own class nested in
``backbone.model._target_``, which the user's own command line may name.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from eenet.config import ALLOWED_TARGETS, check_targets, compose_config
from eenet.errors import EENetError
from eenet.models.graph_split import GraphSplitNetwork
from eenet.runs import build_network, check_run_folder
from test_graph_exits import UNet  # the user's own model with a long skip (tests/ is on sys.path)

SIZE = (3, 32, 32)


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


# ---- the allow-list: a run folder's config is data ----------------------------------------------

def graph_config(*overrides):
    return compose_config(["backbone=graph", "backbone.model._target_=test_graph_exits.UNet",
                           "+backbone.model.classes=10", "backbone.exits_at=[enc2,mid]",
                           "dataset=cifar10", *overrides],
                          output_dir="unused")


def run_folder(cfg, folder: Path) -> Path:
    """A finished-looking run folder holding ``cfg`` (resolved, as eenet-train writes it)."""
    folder.mkdir()
    OmegaConf.save(OmegaConf.to_container(cfg, resolve=True), folder / "config.yaml")
    torch.save({}, folder / "model.pt")
    return folder


def test_the_users_class_runs_from_the_command_line_never_from_a_run_folder(tmp_path):
    cfg = graph_config()
    # the user's own command line (trusted, as eenet-train builds it): the class is built
    net = build_network(cfg, SIZE)
    assert isinstance(net, GraphSplitNetwork) and isinstance(net.backbone, UNet)
    assert net.exit_nodes == ["enc2", "mid"]
    # the same config read as data: the builder passes, the class nested in it does not
    assert "eenet.models.graph_backbone.graph_backbone" in ALLOWED_TARGETS
    with pytest.raises(EENetError) as err:
        build_network(cfg, SIZE, trusted=False)
    assert one_line(err).startswith("backbone: model._target_ 'test_graph_exits.UNet' is not one "
                                    "of the classes eenet allows there")
    folder = run_folder(cfg, tmp_path / "run")
    with pytest.raises(EENetError) as err:
        check_run_folder(folder)
    assert one_line(err) == (f"{folder / 'config.yaml'}: backbone.model._target_ "
                             "'test_graph_exits.UNet' is not one of the classes eenet allows "
                             "there; a run folder's config is data and cannot name code to run")
    # not even one of eenet's own builders may stand in the model's place (eenet.runs builds
    # nothing nested in a run's backbone; refused at the root for now, since its RUN_BUILDS
    # does not list the graph builders yet)
    cfg.backbone.model = {"_target_": "eenet.models.graph_backbone.torchvision_backbone",
                          "name": "resnet18", "num_classes": 10}
    with pytest.raises(EENetError, match=r"backbone(\.model)?\._target_ '\S+' is not one of the "):
        check_run_folder(run_folder(cfg, tmp_path / "nested"))


@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_every_target_of_a_torchvision_or_timm_run_is_allowed(source):
    cfg = compose_config([f"backbone={source}", "backbone.name=resnet18", "dataset=cifar10"],
                         output_dir="unused")
    check_targets(cfg, "config.yaml")  # the whole config: data module, optimizer, trainer, ...
    assert cfg.backbone._target_ == f"eenet.models.graph_backbone.{source}_backbone"
    with pytest.raises(EENetError, match="backbone.kwargs._target_ 'os.system' is not one"):
        check_targets(compose_config([f"backbone={source}", "dataset=cifar10",
                                      "+backbone.kwargs._target_=os.system"],
                                     output_dir="unused"), "config.yaml")


@pytest.mark.xfail(strict=True, raises=EENetError, reason=(
    "eenet/runs.py RUN_BUILDS['backbone'] does not list the graph builders yet (another "
    "engineer's file): check_run_folder refuses 'eenet.models.graph_backbone.<source>_backbone'"))
@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_a_torchvision_or_timm_run_folder_is_accepted(source, tmp_path):
    cfg = compose_config([f"backbone={source}", "backbone.name=resnet18", "dataset=cifar10"],
                         output_dir="unused")
    assert check_run_folder(run_folder(cfg, tmp_path / "run")).backbone.name == "resnet18"
