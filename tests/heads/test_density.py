"""Sampling and calibration (geo.heads.density) against independent references: scipy's vMF sampler, closed
forms, Monte Carlo from 10^6 exact samples, and a perfectly specified model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import vonmises_fisher

from geo.heads import create_head
from geo.heads.density import (DEFAULT_SAMPLES, cell_hpd, monte_carlo_area_se, monte_carlo_hpd, sample_cells,
                               sample_vmf, sample_vmf_mixture, vmf_credible_area_sr, vmf_hpd_level)
from geo.metrics import CALIBRATION_GRID, coverage
from geo.sphere.partition import Partition
from support.sphere import fibonacci_sphere


def _unit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def _log_vmf(x: np.ndarray, mu: np.ndarray, kappa: float) -> np.ndarray:
    """Independent float64 vMF log-density per steradian: kappa / (4 pi sinh kappa) e^(kappa mu.x), in a stable form."""
    log_c = math.log(kappa) - math.log(2 * math.pi) - math.log1p(-math.exp(-2 * kappa))
    return log_c - kappa * 0.5 * np.sum((x - mu) ** 2, axis=-1)


def _mean_resultant(kappa: float) -> float:
    """E[mu . x] of a vMF on S^2: coth(kappa) - 1 / kappa."""
    return 1.0 / math.tanh(kappa) - 1.0 / kappa


@pytest.mark.parametrize("kappa", [0.5, 5.0, 80.0, 3000.0])
def test_vmf_sampler_moments_match_scipy(kappa):
    mu = _unit([0.3, -0.5, 0.8])
    n = 200_000
    ours = sample_vmf(torch.from_numpy(np.tile(mu, (n, 1))), torch.full((n,), math.log(kappa)),
                      torch.Generator().manual_seed(0)).numpy()
    ref = vonmises_fisher(mu, kappa).rvs(n, random_state=np.random.default_rng(1))
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-12)
    # first moment: E[x] = A(kappa) mu; second: the covariance of x; 5 standard errors of the means
    for samples in (ours, ref):
        se = samples.std(0) / math.sqrt(n)
        assert np.all(np.abs(samples.mean(0) - _mean_resultant(kappa) * mu) < 5 * se + 1e-12)
    np.testing.assert_allclose(np.cov(ours.T), np.cov(ref.T), atol=5 * max(np.cov(ref.T).max(), 1e-8) / math.sqrt(n) * 3)
    # the law of 1 - mu.x (the closed-form CDF), by a Kolmogorov-Smirnov distance between the two samplers
    t_ours = np.sort(0.5 * np.sum((ours - mu) ** 2, axis=1))
    t_ref = np.sort(0.5 * np.sum((ref - mu) ** 2, axis=1))
    grid = np.quantile(t_ref, np.linspace(0.01, 0.99, 99))
    gap = np.abs(np.searchsorted(t_ours, grid) - np.searchsorted(t_ref, grid)).max() / n
    assert gap < 1.63 * math.sqrt(2 / n) * 1.5  # KS at ~1 % (two samples), with margin


@pytest.mark.parametrize("log_kappa", [math.log(1e-6), 0.0, 16.0, math.log(1e9)])
def test_vmf_sampler_is_exact_at_extreme_kappa(log_kappa):
    """E[1 - mu.x] = 1 / kappa - 2 / (e^(2 kappa) - 1) (2/3 -> 1 as kappa -> 0), from kappa = 1e-6 to 1e9."""
    kappa = math.exp(log_kappa)
    mu = _unit([0.0, 0.6, -0.8])
    n = 100_000
    x = sample_vmf(torch.from_numpy(np.tile(mu, (n, 1))), torch.full((n,), log_kappa),
                   torch.Generator().manual_seed(2)).numpy()
    t = 0.5 * np.sum((x - mu) ** 2, axis=1)
    expected = 1.0 if kappa < 1e-3 else 1.0 / kappa - (2.0 / math.expm1(2 * kappa) if kappa < 300 else 0.0)
    assert np.all(np.isfinite(x)) and abs(t.mean() / expected - 1) < 5 * t.std() / expected / math.sqrt(n)
    # the azimuth around mu is uniform: the tangent parts average to ~0 relative to their size
    tangent = x - (x @ mu)[:, None] * mu
    scale = np.linalg.norm(tangent, axis=1).mean()
    assert np.linalg.norm(tangent.mean(0)) < 5 * scale / math.sqrt(n)


@pytest.mark.parametrize("kappa", [0.3, 12.0, 500.0, 1e9])
def test_vmf_closed_form_hpd_level_matches_a_million_samples(kappa):
    """(1 - e^(-kappa (1 - mu.y))) / (1 - e^(-2 kappa)) = the mass of 10^6 exact samples where the density is higher."""
    mu = _unit([1.0, 2.0, 2.0])
    n = 1_000_000
    samples = vonmises_fisher(mu, kappa).rvs(n, random_state=np.random.default_rng(3)) if kappa < 1e6 else \
        sample_vmf(torch.from_numpy(np.tile(mu, (n, 1))), torch.full((n,), math.log(kappa)),
                   torch.Generator().manual_seed(3)).numpy()
    log_p = np.sort(_log_vmf(samples, mu, kappa))
    # truths at a range of distances: where the density is a given quantile of the samples' densities
    ys = sample_vmf(torch.from_numpy(np.tile(mu, (7, 1))), torch.full((7,), math.log(kappa)),
                    torch.Generator().manual_seed(4)).numpy()
    closed = vmf_hpd_level(torch.from_numpy(np.tile(mu, (7, 1))), torch.full((7,), math.log(kappa)),
                           torch.from_numpy(ys)).numpy()
    mc = 1.0 - np.searchsorted(log_p, _log_vmf(ys, mu, kappa), side="right") / n
    np.testing.assert_allclose(closed, mc, atol=5 * 0.5 / math.sqrt(n))
    # the credible cap's area: the mass inside 1 - cos r = u_a is a (closed-form CDF, checked by the samples)
    area = vmf_credible_area_sr(torch.tensor([math.log(kappa)]), [0.5, 0.95]).numpy()[0]
    t = 0.5 * np.sum((samples - mu) ** 2, axis=1)
    for a, area_sr in zip([0.5, 0.95], area):
        assert abs(np.mean(t <= area_sr / (2 * math.pi)) - a) < 5 * math.sqrt(a * (1 - a) / n)


def test_monte_carlo_hpd_of_a_single_vmf_equals_its_closed_form():
    """The Monte Carlo estimator (levels and importance-sampled areas) against the closed forms."""
    mu = _unit([0.2, 0.1, -1.0])
    kappa = 40.0
    n = 200_000
    y = sample_vmf(torch.from_numpy(np.tile(mu, (5, 1))), torch.full((5,), math.log(kappa)),
                   torch.Generator().manual_seed(5))
    x = sample_vmf(torch.from_numpy(np.tile(mu, (5, n, 1))), torch.full((5, n), math.log(kappa)),
                   torch.Generator().manual_seed(6)).numpy()
    hpd, area = monte_carlo_hpd(torch.from_numpy(_log_vmf(y.numpy(), mu, kappa)),
                                torch.from_numpy(_log_vmf(x, mu, kappa)), [0.5, 0.95])
    closed = vmf_hpd_level(torch.from_numpy(np.tile(mu, (5, 1))), torch.full((5,), math.log(kappa)), y)
    np.testing.assert_allclose(hpd.numpy(), closed.numpy(), atol=5 * 0.5 / math.sqrt(n))
    np.testing.assert_allclose(area.numpy(), vmf_credible_area_sr(torch.full((5,), math.log(kappa)),
                                                                  [0.5, 0.95]).numpy(), rtol=0.02)


def test_monte_carlo_area_standard_error_matches_the_spread_over_repeats():
    """Importance-sampled credible areas at the default 2500 samples, 400 repeats of one vMF: their spread
    equals the closed form of the module docstring (1.05 % and 3.2 % of the area for kappa >> 1) and the
    per-row estimate ``monte_carlo_area_se``."""
    mu = _unit([0.3, -0.4, 0.8])
    kappa, n, repeats = 200.0, DEFAULT_SAMPLES, 400
    x = sample_vmf(torch.from_numpy(np.tile(mu, (repeats, n, 1))), torch.full((repeats, n), math.log(kappa)),
                   torch.Generator().manual_seed(11)).numpy()
    log_p = torch.from_numpy(_log_vmf(x, mu, kappa))
    _, area = monte_carlo_hpd(log_p[:, 0], log_p, [0.5, 0.95])
    se = monte_carlo_area_se(log_p, [0.5, 0.95]).numpy()
    closed = vmf_credible_area_sr(torch.tensor([math.log(kappa)]), [0.5, 0.95])[0].numpy()
    # the influence function's variance in the mass coordinate w = 1 - e^{-kappa (1 - mu.x)} ~ U(0, 1)
    for j, a in enumerate((0.5, 0.95)):
        second = 1 / (1 - a) - 1 - 2 / (1 - a) * -math.log(1 - a) + a / (1 - a) ** 2
        first = -math.log(1 - a) - a / (1 - a)
        rel_closed = math.sqrt((second - first ** 2) / n) / -math.log(1 - a)
        rel_sd = area[:, j].numpy().std() / closed[j]
        assert abs(rel_sd / rel_closed - 1) < 0.15              # 400 repeats: the sd is known to ~4 %
        assert abs(np.median(se[:, j]) / closed[j] / rel_closed - 1) < 0.15
    assert abs(area.numpy().mean(axis=0) / closed - 1).max() < 0.01


# ---- a perfectly specified model ------------------------------------------------------------------------


MIXTURE = dict(weights=np.array([0.5, 0.3, 0.2]), mu=np.array([_unit([1, 0, 0.2]), _unit([0, 1, 0.5]),
                                                               _unit([-0.3, -0.2, -1])]),
               kappa=np.array([30.0, 300.0, 4.0]))


def _draw_from_mixture(n: int, seed: int) -> np.ndarray:
    """n points from MIXTURE by scipy's sampler (independent of geo's)."""
    rng = np.random.default_rng(seed)
    comp = rng.choice(3, size=n, p=MIXTURE["weights"])
    out = np.empty((n, 3))
    for k in range(3):
        idx = np.flatnonzero(comp == k)
        out[idx] = vonmises_fisher(MIXTURE["mu"][k], MIXTURE["kappa"][k]).rvs(len(idx), random_state=rng)
    return out


def _mixture_head_output(n: int, kappa_factor: float = 1.0) -> torch.Tensor:
    """The vmf-mixture head's output [n, 3, 5] for MIXTURE (log pi, mean, log kappa) on every row."""
    row = np.concatenate([np.log(MIXTURE["weights"])[:, None], MIXTURE["mu"],
                          np.log(MIXTURE["kappa"] * kappa_factor)[:, None]], axis=1)
    return torch.from_numpy(np.tile(row, (n, 1, 1)))


@pytest.mark.parametrize("head_name", ["vmf-mixture", "mvmf"])
def test_a_perfectly_specified_model_is_calibrated_and_an_overconfident_one_is_not(head_name):
    """Locations drawn from a known mixture, scored by that mixture: coverage within Monte Carlo error of every
    level; the same mixture made twice as confident (kappa x 4: half the angular spread) covers far less."""
    n = 1000
    y = torch.from_numpy(_draw_from_mixture(n, seed=7))
    if head_name == "vmf-mixture":
        head = create_head("vmf-mixture", feature_dim=4, n_components=3).double()
        outputs = {1.0: _mixture_head_output(n), 4.0: _mixture_head_output(n, 4.0)}
        heads = {1.0: head, 4.0: head}
    else:
        class Three:  # a partition of 3 "cells" whose centres are the components' means
            n_cells = 3
            centres_xyz = means_xyz = MIXTURE["mu"]
        heads, outputs = {}, {}
        for factor in (1.0, 4.0):
            head = create_head("mvmf", feature_dim=4, partition=Three()).double()
            with torch.no_grad():
                head.log_kappa.copy_(torch.from_numpy(np.log(MIXTURE["kappa"] * factor)))
            heads[factor] = head
            outputs[factor] = torch.from_numpy(np.tile(np.log(MIXTURE["weights"]), (n, 1)))
    levels = np.asarray(CALIBRATION_GRID)
    covered = {}
    for factor in (1.0, 4.0):
        hpd, _ = heads[factor].calibration(outputs[factor], y, n_samples=2500,
                                           generator=torch.Generator().manual_seed(8))
        covered[factor] = coverage(hpd.numpy(), levels)
    # binomial error of a coverage over n images (<= 0.011) plus the levels' own Monte Carlo error (<= 0.01 each,
    # averaging out over images): 4 binomial standard errors
    tolerance = 4 * np.sqrt(levels * (1 - levels) / n) + 0.005
    assert np.all(np.abs(covered[1.0] - levels) < tolerance), np.c_[levels, covered[1.0]]
    assert covered[4.0][levels == 0.5][0] < 0.3 and covered[4.0][levels == 0.95][0] < 0.75
    assert np.all(covered[4.0] < levels) and np.all(covered[4.0][levels >= 0.3] < levels[levels >= 0.3] - 0.1)


# ---- cells -----------------------------------------------------------------------------------------------


def _partition(n_cells: int) -> Partition:
    rng = np.random.default_rng(0)
    return Partition.build(np.degrees(np.arcsin(rng.uniform(-1, 1, 5000))), rng.uniform(-180, 180, 5000), n_cells)


def test_cell_samples_are_uniform_within_their_cells():
    """Counts per cell match p (chi-square), and within a cell the points are uniform by area: the S2 sub-cells
    two levels down receive counts in proportion to their exact areas."""
    part = _partition(40)
    from geo.sphere import s2cells

    probs = np.random.default_rng(1).dirichlet(np.ones(part.n_cells))
    n = 200_000
    xyz = sample_cells(torch.from_numpy(probs)[None], part, n, torch.Generator().manual_seed(9))[0].numpy()
    np.testing.assert_allclose(np.linalg.norm(xyz, axis=1), 1.0, atol=1e-12)
    lat, lon = np.degrees(np.arcsin(np.clip(xyz[:, 2], -1, 1))), np.degrees(np.arctan2(xyz[:, 1], xyz[:, 0]))
    cells = part.assign(lat, lon)
    from scipy.stats import chisquare

    assert chisquare(np.bincount(cells, minlength=part.n_cells), probs * n).pvalue > 1e-4
    # inside the most probable cell's first piece: its 16 grandchildren, by area
    top = int(np.argmax(probs))
    piece = part.piece_ids[part.piece_cells == top][0]
    grandchildren = s2cells.child_ids(s2cells.child_ids(np.array([piece], np.uint64)).reshape(-1)).reshape(-1)
    leaf = s2cells.xyz_to_leaf_ids(xyz[cells == top])
    lo, hi = s2cells.range_min(grandchildren), 2 * grandchildren - s2cells.range_min(grandchildren)
    which = np.argmax((leaf[:, None] >= lo[None]) & (leaf[:, None] <= hi[None]), axis=1)
    inside = (leaf[:, None] >= lo[None]) & (leaf[:, None] <= hi[None])
    counts = np.bincount(which[inside.any(1)], minlength=16)
    area = s2cells.cell_areas_sr(grandchildren)
    assert chisquare(counts, area / area.sum() * counts.sum()).pvalue > 1e-4


def test_cell_hpd_levels_are_the_masses_of_denser_cells_with_a_uniform_share_of_ties():
    part = _partition(30)
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(part.n_cells) * 0.5)
    log_areas = np.log(part.areas_sr)
    dens = np.log(probs) - log_areas
    reps = 4000
    cell = np.full(reps, int(np.argsort(dens)[part.n_cells // 2]))   # a middle cell
    hpd, area = cell_hpd(torch.from_numpy(np.tile(np.log(probs), (reps, 1))), torch.from_numpy(log_areas),
                         torch.from_numpy(cell), [0.5, 0.95], torch.Generator().manual_seed(3))
    higher = probs[dens > dens[cell[0]]].sum()
    hpd = hpd.numpy()
    assert np.all((hpd >= higher - 1e-12) & (hpd <= higher + probs[cell[0]] + 1e-12))
    # the tie share is uniform: the mean is at the interval's middle, the spread that of a uniform law
    assert abs(hpd.mean() - (higher + probs[cell[0]] / 2)) < 5 * probs[cell[0]] / math.sqrt(12 * reps)
    # areas: the densest cells, brute force
    order = np.argsort(-dens)
    cum = np.cumsum(probs[order])
    for j, a in enumerate([0.5, 0.95]):
        k = int(np.searchsorted(cum, a))
        expected = part.areas_sr[order[:k]].sum() + (a - (cum[k] - probs[order[k]])) / probs[order[k]] * \
            part.areas_sr[order[k]]
        assert area[0, j].item() == pytest.approx(expected, rel=1e-9)


def test_mixture_sampling_picks_components_by_weight():
    mu = torch.from_numpy(np.stack([_unit([1, 0, 0]), _unit([-1, 0, 0])]))[None]
    log_w = torch.log(torch.tensor([[0.25, 0.75]], dtype=torch.float64))
    x = sample_vmf_mixture(log_w, mu, torch.full((1, 2), math.log(1e4), dtype=torch.float64), 40_000,
                           torch.Generator().manual_seed(4))[0]
    share = float((x[:, 0] < 0).double().mean())
    assert abs(share - 0.75) < 5 * math.sqrt(0.75 * 0.25 / 40_000)


def test_cell_sampling_of_a_partition_without_s2_pieces_uses_its_assign():
    from support.sphere import CubePartition

    part = CubePartition()
    probs = torch.tensor([[0.5, 0.1, 0.1, 0.1, 0.1, 0.1]], dtype=torch.float64)
    xyz = sample_cells(probs, part, 30_000, torch.Generator().manual_seed(5))[0].numpy()
    cells = part.assign(np.degrees(np.arcsin(np.clip(xyz[:, 2], -1, 1))), np.degrees(np.arctan2(xyz[:, 1], xyz[:, 0])))
    assert abs(np.mean(cells == 0) - 0.5) < 5 * math.sqrt(0.25 / 30_000)
    # uniform on the +x face: the face's points have z-coordinates symmetric about 0 and a fibonacci-lattice mean
    face = fibonacci_sphere(200_000)
    face = face[np.argmax(np.abs(face), 1) == 0]
    face = face[face[:, 0] > 0]
    np.testing.assert_allclose(xyz[cells == 0].mean(0), face.mean(0), atol=0.01)


def test_mvmf_log_density_rows_equals_its_grid_density_with_light_components_dropped():
    """The MvMF's per-row density at its own points (what Monte Carlo HPD levels use) equals ``log_density``,
    also for peaked mixing weights where the lightest components (< 1e-9 of the weight) are left out."""
    part = _partition(64)
    head = create_head("mvmf", feature_dim=4, partition=part, kappa0=math.log(200.0)).double()
    logits = torch.randn(3, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 8  # peaked
    points = head.sample(logits, 500, generator=torch.Generator().manual_seed(2))
    rows = head.log_density_rows(logits, points)
    grid = torch.stack([head.log_density(logits[r:r + 1], points[r])[0] for r in range(3)])
    assert torch.exp(torch.log_softmax(logits, -1)).lt(1e-10).any()  # some components are dropped
    torch.testing.assert_close(rows, grid, rtol=0, atol=1e-6)
