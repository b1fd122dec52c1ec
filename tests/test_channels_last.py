"""``channels_last=true``: training in channels-last (NHWC) memory order computes the same
function (only float rounding differs, measured against float64 in the same run), every
training batch and the conv weights are NHWC, and the setting may change on resume."""

from __future__ import annotations

import json

import copy

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from eenet.config import compose_config
from eenet.config_checks import check_train_config
from eenet.errors import EENetError
from eenet.jobs.train import train
from eenet.runs import build_network, check_resume_config

BASE = ["trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=none", "threads=1",
        "anytime=false"]


def _nhwc(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def test_nhwc_computes_the_same_function_as_nchw():
    """resnet20 with SDN's six conv exits, 3x32x32, in training mode: every exit's logits and
    every weight gradient, NHWC against NCHW.

    In float64 both layouts must agree to float64 rounding: within 2^-40 (about 4,000 float64
    epsilons) of the largest value; measured here about 10 epsilons. In float32 (the kernels
    training uses) the NCHW path's own error against float64 is the floor, measured in this
    run; NHWC's forward error must be within 100x of it (about 3x measured: other kernels,
    other summation order). Float32 gradients are not compared: a pre-activation that rounds
    across zero flips a ReLU's gradient, a jump of the gradient's own size in either layout.
    A layout bug (NHWC memory read as NCHW) gives errors of the values' own size: checked."""
    torch.manual_seed(0)
    cfg = compose_config(["experiment=cifar10_recipe/resnet20_sdn"], output_dir="unused")
    net = build_network(cfg, (3, 32, 32)).train()
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))

    def run(module, inp):
        module.zero_grad()
        logits = module(inp).logits
        sum(torch.nn.functional.cross_entropy(z, y) for z in logits).backward()
        grads = {n: p.grad.double().clone() for n, p in module.named_parameters()
                 if p.grad is not None}
        return [z.detach().double() for z in logits], grads

    def nhwc(module):
        return module.to(memory_format=torch.channels_last)

    def err(a, b):
        return max(float((u - v).abs().max()) for u, v in zip(a, b))

    ref_logits, ref_grads = run(copy.deepcopy(net).double(), x.double())
    cl_net = nhwc(copy.deepcopy(net).double())
    assert sum(_nhwc(p) for p in cl_net.parameters()) > 20  # the conv weights moved
    cl_logits, cl_grads = run(cl_net, x.double().contiguous(memory_format=torch.channels_last))
    names = sorted(ref_grads)
    assert len(names) > 20 and set(cl_grads) == set(names)
    scale = max(float(t.abs().max()) for t in [*ref_logits, *ref_grads.values()])
    assert err(cl_logits, ref_logits) <= 2 ** -40 * scale
    assert err([cl_grads[n] for n in names], [ref_grads[n] for n in names]) <= 2 ** -40 * scale

    floor = err(run(copy.deepcopy(net), x)[0], ref_logits)
    nhwc32 = err(run(nhwc(copy.deepcopy(net)), x.contiguous(memory_format=torch.channels_last))[0],
                 ref_logits)
    assert 0 < nhwc32 <= 100 * floor, (nhwc32, floor)
    # and the checks can fail: the same NHWC memory read as NCHW is far outside them
    moved = x.contiguous(memory_format=torch.channels_last)
    scrambled = torch.as_strided(moved, moved.shape, x.stride())
    assert err(run(copy.deepcopy(net), scrambled)[0], ref_logits) > 100 * floor


class Layout(L.Callback):
    """The memory order of every input the network gets (train, val, test) and of its 3x3
    conv weights at each call."""

    def __init__(self):
        self.inputs: list[bool] = []
        self.weights: list[bool] = []

    def on_fit_start(self, trainer, pl_module):
        def record(module, args):
            self.inputs.append(_nhwc(args[0]))
            self.weights.append(all(_nhwc(p) for p in module.parameters()
                                    if p.ndim == 4 and p.shape[-1] > 1))
        pl_module.net.register_forward_pre_hook(record)


@pytest.mark.parametrize("channels_last", [True, False])
def test_a_run_trains_in_the_memory_order_it_asks_for(train_config, tmp_path, data_root,
                                                      channels_last):
    """CIFAR-10 (JPEG), three channels (with one, NHWC and NCHW are the same memory)."""
    layout = Layout()
    cfg = train_config(BASE + [f"channels_last={channels_last}", "+ema.decay=0.9",
                               "dataset=cifar10_jpeg", f"data_root={data_root.path}",
                               "dataset.datamodule.train_subset=300",
                               "dataset.datamodule.val_size=60", "dataset.datamodule.test_subset=60"])
    results, _ = train(cfg, extra_callbacks=[layout])
    assert len(layout.inputs) >= 4 and set(layout.inputs) == {channels_last}
    assert set(layout.weights) == {channels_last}
    assert results["test"]["n"] == 60
    # model.pt is weights as data and loads into a network built the ordinary (NCHW) way
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    fresh = build_network(cfg, (3, 32, 32))
    fresh.load_state_dict(state)
    assert not any(_nhwc(p) for p in fresh.parameters())
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["config"]["channels_last"] is channels_last


def test_channels_last_may_change_on_resume_and_must_be_a_boolean(tmp_path):
    """A run started before the setting existed (no channels_last in its config.yaml) resumes
    with it on; another difference (the seed) is still refused."""
    run = tmp_path / "run"
    run.mkdir()
    started = compose_config(["experiment=cifar10_recipe/resnet20"], output_dir=str(run))
    saved = OmegaConf.to_container(started, resolve=True)
    del saved["channels_last"]
    OmegaConf.save(OmegaConf.create(saved), run / "config.yaml")
    check_resume_config(compose_config(["experiment=cifar10_recipe/resnet20", "channels_last=true",
                                        "resume=true"], output_dir=str(run)), run)
    with pytest.raises(EENetError, match="seed"):
        check_resume_config(compose_config(["experiment=cifar10_recipe/resnet20", "seed=1",
                                            "resume=true"], output_dir=str(run)), run)
    with pytest.raises(EENetError, match="channels_last") as err:
        check_train_config(compose_config(BASE + ["channels_last=maybe"], output_dir=str(run)))
    assert "\n" not in str(err.value)
