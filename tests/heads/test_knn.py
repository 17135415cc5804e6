"""knn retrieval: exact top-k equal to brute force; the paper's section 3.3 (an MvMF with c = n, mu_i = y_i and
w_i = the i-th normalised training feature predicts what 1-NN retrieval predicts); kappa chosen on val."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp
from scipy.stats import vonmises_fisher

from geo.errors import ConfigError
from geo.heads import create_head
from geo.heads.knn import topk_cosine
from support.sphere import latlon_xyz


def _gallery(n=500, d=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), np.degrees(np.arcsin(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)


@pytest.mark.parametrize("block_rows", [1, 37, 500, 10_000])
def test_blocked_topk_equals_brute_force(block_rows):
    feats, lat, lon = _gallery()
    head = create_head("knn", feature_dim=16, k=7, block_rows=block_rows)
    head.fit_gallery(feats, lat, lon)
    queries = np.random.default_rng(1).normal(size=(30, 16))
    out = head(torch.from_numpy(queries).float())
    g = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q @ g.T                                                   # float64 brute force
    order = np.argsort(-sims, axis=1)[:, :7]
    np.testing.assert_allclose(out[..., 0].numpy(), np.take_along_axis(sims, order, 1), atol=1e-6)
    np.testing.assert_allclose(out[..., 1:].numpy(), latlon_xyz(lat, lon)[order], atol=1e-6)
    s, i = topk_cosine(torch.from_numpy(q), torch.from_numpy(g), 7, block_rows)
    np.testing.assert_array_equal(i.numpy(), order)


def test_mvmf_with_a_component_per_training_point_is_1nn_retrieval():
    # Paper section 3.3: c = n components, mu_i = y_i, W's rows the normalised training features:
    # the MvMF's argmax component (eq. 7) is the training image of highest cosine similarity.
    feats, lat, lon = _gallery(n=200, d=12, seed=3)
    y = latlon_xyz(lat, lon)
    part = SimpleNamespace(centres_xyz=y, means_xyz=y, areas_sr=np.full(200, 4 * np.pi / 200), n_cells=200)
    mvmf = create_head("mvmf", feature_dim=12, partition=part).double()
    with torch.no_grad():
        mvmf.linear.weight.copy_(torch.from_numpy(feats / np.linalg.norm(feats, axis=1, keepdims=True)))
        mvmf.linear.bias.zero_()
    knn = create_head("knn", feature_dim=12, k=1).double()
    knn.fit_gallery(feats, lat, lon)
    queries = torch.from_numpy(np.random.default_rng(4).normal(size=(64, 12)) * 5)
    lat_m, lon_m = mvmf.predict(mvmf(queries), mode="argmax")
    lat_k, lon_k = knn.predict(knn(queries), mode="nn")
    np.testing.assert_allclose(lat_m.numpy(), lat_k.numpy(), atol=1e-9)
    np.testing.assert_allclose(lon_m.numpy(), lon_k.numpy(), atol=1e-9)


def test_density_against_scipy_and_kappa_chosen_on_val():
    feats, lat, lon = _gallery()
    head = create_head("knn", feature_dim=16, k=5).double()
    head.fit_gallery(feats, lat, lon)
    rng = np.random.default_rng(2)
    queries = torch.from_numpy(feats[:60] + 0.3 * rng.normal(size=(60, 16)))
    y_val = torch.from_numpy(latlon_xyz(lat[:60] + rng.normal(0, 2, 60), lon[:60]))
    out = head(queries)
    head.calibrate(out, y_val)
    log_kappa = float(head.log_kappa)
    sims, mu = out[..., 0].numpy(), out[..., 1:].numpy()

    def scipy_mean_ll(lk):
        w = np.maximum(sims, 0) + 1e-6
        w /= w.sum(1, keepdims=True)
        ll = [logsumexp([math.log(w[b, i]) + vonmises_fisher(mu[b, i] / np.linalg.norm(mu[b, i]), math.exp(lk))
                         .logpdf(y_val[b].numpy()) for i in range(5)]) for b in range(60)]
        return np.mean(ll), np.array(ll)

    mean_ll, per_row = scipy_mean_ll(log_kappa)
    np.testing.assert_allclose(head.log_density_at(out, y_val).detach().numpy(), per_row, rtol=1e-9, atol=1e-9)
    best = minimize_scalar(lambda lk: -scipy_mean_ll(lk)[0], bounds=(log_kappa - 1, log_kappa + 1),
                           method="bounded", options={"xatol": 1e-6}).x
    assert log_kappa == pytest.approx(best, abs=1e-3)


def test_errors():
    head = create_head("knn", feature_dim=4, k=3)
    with pytest.raises(ConfigError, match="no gallery"):
        head(torch.zeros(1, 4))
    with pytest.raises(ConfigError, match="gallery must be"):
        head.fit_gallery(np.zeros((2, 4)), np.zeros(2), np.zeros(2))
