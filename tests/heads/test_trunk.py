"""The optional deep trunk (--trunk-depth): any of mvmf, softmax, regression, vmf, vmf-mixture can be deep."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from geo.heads import create_head
from geo.heads.trunk import ResidualTrunk
from geo.training.config import FitConfig
from geo.training.sweep import sweep_grid
from test_registry import HEADS, batch, make, partition_of, FEATURE_DIM

DEEP = ["mvmf", "softmax", "regression", "vmf", "vmf-mixture"]


@pytest.mark.parametrize("name", DEEP)
def test_a_deep_head_trains_every_parameter_and_is_rebuilt_from_its_options(name):
    head = make(name, trunk_depth=2, trunk_width=16)
    assert isinstance(head.trunk, ResidualTrunk) and head.linear.in_features == 16
    assert head.options["trunk_depth"] == 2 and head.options["trunk_width"] == 16
    json.dumps(head.options)
    x, y = batch(16)
    out = head(x)
    assert out.shape == HEADS[name]["shape"](16)
    head.loss(out, y).backward()
    for n, p in head.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    again = create_head(name, feature_dim=FEATURE_DIM, partition=partition_of(name), **head.options)
    again.load_state_dict(head.state_dict())
    torch.testing.assert_close(again(x), head(x))
    # the trunk is what the head's linear layer sees: the output equals linear(trunk(x)) by hand
    h = head.trunk.lift(x)
    for block in head.trunk.blocks:
        h = h + block(h)
    torch.testing.assert_close(head.linear_product(x), head.linear(head.trunk.norm(h)))


@pytest.mark.parametrize("name", DEEP)
def test_without_a_trunk_the_options_are_unchanged(name):
    head = make(name)
    assert head.trunk is None and "trunk_depth" not in head.options and head.linear.in_features == FEATURE_DIM


def test_trunk_options_come_from_the_config_and_name_the_runs():
    from geo.heads import head_class

    config = dataclasses.asdict(FitConfig(trunk_depth=3, trunk_width=64))
    assert head_class("mvmf").options_from_config(config)["trunk_depth"] == 3
    assert "trunk_depth" not in head_class("mvmf").options_from_config(dataclasses.asdict(FitConfig()))
    grid = sweep_grid(["mvmf", "softmax", "flow"], [16], [8], FitConfig(trunk_depth=3, trunk_width=64))
    assert [name for name, _ in grid] == ["mvmf-c16-k8-deep3x64", "softmax-c16-deep3x64", "flow-c16"]
