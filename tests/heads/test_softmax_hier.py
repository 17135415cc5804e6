"""softmax-hier: one level is the softmax head; the joint loss and the fine-cell product against numpy float64;
rebuilt from the saved partition alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import log_softmax

from geo.errors import ConfigError
from geo.heads import create_head
from geo.sphere.hierarchy import coarser_cells
from geo.sphere.partition import Partition
from support.sphere import latlon_xyz


@pytest.fixture(scope="module")
def partition():
    rng = np.random.default_rng(0)
    return Partition.build(np.clip(rng.normal(20, 30, 5000), -89, 89), rng.uniform(-180, 180, 5000), 96)


def _batch(seed=0, n=40, d=8):
    rng = np.random.default_rng(seed)
    lat, lon = np.degrees(np.arcsin(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)
    return torch.from_numpy(rng.normal(size=(n, d))).float(), lat, lon


def test_one_level_is_the_softmax_head(partition):
    torch.manual_seed(0)
    hier = create_head("softmax-hier", feature_dim=8, partition=partition, levels=1)
    plain = create_head("softmax", feature_dim=8, partition=partition)
    plain.load_state_dict(hier.state_dict())
    x, lat, lon = _batch()
    y = torch.from_numpy(latlon_xyz(lat, lon)).float()
    a, b = hier(x), plain(x)
    torch.testing.assert_close(hier.loss(a, y), plain.loss(b, y))
    torch.testing.assert_close(hier.log_density_at(a, y), plain.log_density_at(b, y))
    torch.testing.assert_close(hier.log_density(a, y[:7]), plain.log_density(b, y[:7]))
    for mode in hier.predict_modes:
        torch.testing.assert_close(hier.predict(a, k=3, mode=mode), plain.predict(b, k=3, mode=mode))
    torch.testing.assert_close(hier.topk(a, 3), plain.topk(b, 3))


def test_loss_and_fine_scores_match_numpy_float64(partition):
    torch.manual_seed(1)
    head = create_head("softmax-hier", feature_dim=8, partition=partition, levels=3)
    c = partition.n_cells
    anc1, c1 = coarser_cells(partition, c // 4)
    anc2, c2 = coarser_cells(partition, c // 16)
    assert head.level_sizes == [c, c1, c2] and head(torch.zeros(2, 8)).shape == (2, c + c1 + c2)
    with torch.no_grad():
        head.linear.weight.normal_(0, 1.0)
    x, lat, lon = _batch(3)
    joint = head(x)
    z = joint.detach().double().numpy()
    lp0, lp1, lp2 = log_softmax(z[:, :c], 1), log_softmax(z[:, c:c + c1], 1), log_softmax(z[:, c + c1:], 1)
    fine = partition.assign(lat, lon)
    rows = np.arange(len(fine))
    ref_loss = -(lp0[rows, fine].mean() + lp1[rows, anc1[fine]].mean() + lp2[rows, anc2[fine]].mean())
    y = torch.from_numpy(latlon_xyz(lat, lon)).float()
    assert head.loss(joint, y).item() == pytest.approx(ref_loss, rel=1e-5)
    log_q = log_softmax(lp0 + lp1[:, anc1] + lp2[:, anc2], 1)   # product of a cell's and its ancestors' probs
    np.testing.assert_allclose(head.fine_log_probs(joint).detach().numpy(), log_q, atol=1e-4)
    ref_density = log_q[rows, fine] - np.log(partition.areas_sr[fine])
    np.testing.assert_allclose(head.log_density_at(joint, y).detach().numpy(), ref_density, atol=1e-4)
    np.testing.assert_array_equal(head.topk(joint, 1)[1][:, 0].numpy(), np.argmax(log_q, 1))


def test_rebuilt_from_the_saved_partition(partition):
    torch.manual_seed(2)
    head = create_head("softmax-hier", feature_dim=8, partition=partition)
    again = create_head("softmax-hier", feature_dim=8, partition=Partition.from_state_dict(partition.state_dict()),
                        **head.options)
    again.load_state_dict(head.state_dict())
    x, _, _ = _batch(4)
    torch.testing.assert_close(again.fine_log_probs(again(x)), head.fine_log_probs(head(x)))
    with pytest.raises(ConfigError, match="levels"):
        create_head("softmax-hier", feature_dim=8, partition=partition, levels=5)
