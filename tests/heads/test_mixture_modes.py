"""``geo.heads.mixture_modes``: the accelerated search (per-start stopping, Newton and stretched
steps) returns the same maxima as the plain MM iteration it replaced, kept here as the reference,
on knn-shaped mixtures (16 components, one kappa per row) and on mixed-kappa ones, near ties of
two modes and near the bifurcation of one mode into two."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from geo.geometry import normalize, vmf_log_normalizer
from geo.heads.mixture_modes import mixture_modes

METRE_RAD = 1.0 / 6371.0088e3  # one metre on the earth, radians


def reference_modes(log_weights: torch.Tensor, mu_xyz: torch.Tensor, log_kappa: torch.Tensor, k: int,
                    n_starts: int, max_iter: int, tol_rad: float = 1e-10) -> torch.Tensor:
    """The plain MM search of commit 2e0976a (every start of a row iterates until the row converges): ``[B, k, 3]``."""
    n_starts = max(n_starts, 2 * k)
    lw, mu, lk = log_weights, normalize(mu_xyz), log_kappa
    kappa = torch.exp(lk)
    kappa_mu = kappa[..., None] * mu
    log_norm = vmf_log_normalizer(lk)

    def log_terms(y, rows=slice(None)):
        sq_chord = (y[:, :, None, :] - mu[rows, None, :, :]).pow(2).sum(-1)
        return (lw[rows] + log_norm[rows])[:, None, :] - 0.5 * kappa[rows, None, :] * sq_chord

    sq_chord_means = (2.0 - 2.0 * torch.einsum("bld,bmd->blm", mu, mu)).clamp_min(0.0)
    at_means = torch.logsumexp((lw + log_norm)[:, None, :] - 0.5 * kappa[:, None, :] * sq_chord_means, dim=-1)
    n_start = min(n_starts, lw.shape[1])
    starts = torch.topk(at_means, n_start, dim=-1).indices
    y = torch.gather(mu, 1, starts[..., None].expand(-1, -1, 3)).clone()
    active = torch.arange(y.shape[0])
    last_step = torch.full(y.shape[:2], math.inf, dtype=torch.float64)
    for _ in range(max_iter):
        if active.numel() == 0:
            break
        ya = y[active]
        resp = torch.softmax(log_terms(ya, active), dim=-1)
        y_new = normalize(torch.einsum("bsl,bld->bsd", resp, kappa_mu[active]))
        step = (y_new - ya).norm(dim=-1)
        rho = step / last_step[active]
        linear = (rho < 1) & torch.isfinite(last_step[active])
        left = torch.where(linear, step * rho / (1 - rho), torch.full_like(step, math.inf))
        done = (step <= 1e-13) | (left <= tol_rad)
        y[active], last_step[active] = y_new, step
        active = active[~done.all(dim=-1)]
    assert active.numel() == 0, "the reference did not converge: raise max_iter"
    log_dens = torch.logsumexp(log_terms(y), dim=-1)
    order = torch.argsort(log_dens, dim=-1, descending=True)
    y = torch.gather(y, 1, order[..., None].expand(-1, -1, 3))
    close = (y[:, :, None, :] - y[:, None, :, :]).norm(dim=-1) < 1.6e-7
    repeat = (close & torch.tril(torch.ones(n_start, n_start, dtype=torch.bool), diagonal=-1)).any(dim=-1)
    pick = torch.argsort(repeat.double() * n_start + torch.arange(n_start, dtype=torch.float64), dim=-1)[:, :k]
    return torch.gather(y, 1, pick[..., None].expand(-1, -1, 3))


def log_mixture(log_w: torch.Tensor, mu: torch.Tensor, log_kappa: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log p at points ``y [B, S, 3]`` of each row's mixture, float64 ``[B, S]``."""
    sq_chord = (y[:, :, None, :] - normalize(mu)[:, None, :, :]).pow(2).sum(-1)
    return torch.logsumexp((log_w + vmf_log_normalizer(log_kappa))[:, None, :]
                           - 0.5 * torch.exp(log_kappa)[:, None, :] * sq_chord, dim=-1)


def knn_shaped(n_rows: int, seed: int, n_comp: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mixtures like the knn head's: ``n_comp`` neighbours around 1-3 places, scattered 0.2-3 kernel widths,
    weights max(s, 0) + 1e-6 of random similarities (some negative), one kappa per row, e^2 .. e^16."""
    rng = np.random.default_rng(seed)
    log_kappa = rng.uniform(2.0, 16.0, n_rows)
    width = np.exp(-0.5 * log_kappa)                                       # 1 / sqrt(kappa), rad
    places = rng.normal(size=(n_rows, 3, 3))
    place = rng.integers(0, rng.integers(1, 4, n_rows)[:, None], (n_rows, n_comp))
    centre = np.take_along_axis(places, place[..., None], 1)
    centre /= np.linalg.norm(centre, axis=-1, keepdims=True)
    # the places of a row lie a few kernel widths apart half the time (modes that interact)
    near = rng.random(n_rows) < 0.5
    centre[near] = centre[near, :1] + (centre[near] - centre[near, :1]) * (3 * width[near, None, None])
    scatter = rng.uniform(0.2, 3.0, (n_rows, 1, 1)) * width[:, None, None]
    mu = centre + rng.normal(size=(n_rows, n_comp, 3)) * scatter
    mu /= np.linalg.norm(mu, axis=-1, keepdims=True)
    sims = rng.uniform(-0.2, 0.9, (n_rows, n_comp))
    log_w = np.log(np.maximum(sims, 0.0) + 1e-6)
    log_w -= np.log(np.exp(log_w).sum(-1, keepdims=True))
    return (torch.from_numpy(log_w), torch.from_numpy(mu),
            torch.from_numpy(np.repeat(log_kappa[:, None], n_comp, 1)))


def assert_same_modes(log_w, mu, log_kappa, k: int, n_starts: int = 8) -> None:
    """The search and the reference agree to 1 m, but for a rank swap of two maxima whose densities tie
    to 1e-9 nats (then either order is right): compared as sets, and both at the top density."""
    new = mixture_modes(log_w, mu, log_kappa, k, n_starts, 10_000)
    ref = reference_modes(log_w, mu, log_kappa, k, n_starts, 100_000)
    assert new.shape == ref.shape == (log_w.shape[0], k, 3)
    dist = (new[:, :, None, :] - ref[:, None, :, :]).norm(dim=-1)             # [B, k, k]
    same_rank = dist.diagonal(dim1=1, dim2=2) < METRE_RAD                      # [B, k]
    dens_new, dens_ref = log_mixture(log_w, mu, log_kappa, new), log_mixture(log_w, mu, log_kappa, ref)
    swapped = ~same_rank.all(dim=1)
    for b in swapped.nonzero()[:, 0].tolist():
        assert (dist[b].min(dim=1).values < METRE_RAD).all() and (dist[b].min(dim=0).values < METRE_RAD).all(), \
            f"row {b}: different maxima\n{new[b]}\n{ref[b]}"
        torch.testing.assert_close(dens_new[b], dens_ref[b], rtol=0, atol=1e-9)
    assert swapped.double().mean() < 0.01  # swaps are exceptional
    torch.testing.assert_close(dens_new[:, 0], dens_ref[:, 0], rtol=0, atol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3])
def test_same_modes_as_reference_on_knn_shaped_mixtures(seed, k):
    assert_same_modes(*knn_shaped(200, seed), k)


def test_same_modes_as_reference_with_mixed_kappa_and_weights():
    # the mixture heads' case: each component its own kappa (over 3 decades) and weight, 24 components
    log_w, mu, log_kappa = knn_shaped(300, 5, n_comp=24)
    rng = np.random.default_rng(6)
    log_kappa = log_kappa + torch.from_numpy(rng.uniform(-3.5, 3.5, log_kappa.shape))
    log_w = torch.log_softmax(torch.from_numpy(rng.normal(size=log_w.shape) * 2), dim=-1)
    assert_same_modes(log_w, mu, log_kappa, 1, n_starts=12)
    assert_same_modes(log_w, mu, log_kappa, 4, n_starts=12)


def _twin_clusters(n_rows: int, eps: np.ndarray, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two mirror-image clusters of 8 components (mirrored in the x = 0 plane, 2-6 widths apart), the
    one at x > 0 weighted (1 + eps) / (1 - eps) times the other: two maxima of near-equal density."""
    rng = np.random.default_rng(seed)
    log_kappa = rng.uniform(6.0, 16.0, n_rows)
    width = np.exp(-0.5 * log_kappa)
    half_gap = rng.uniform(1.0, 3.0, n_rows) * width
    base = np.stack([np.sin(half_gap), np.cos(half_gap), np.zeros(n_rows)], -1)  # x > 0 side, near (0, 1, 0)
    right = base[:, None, :] + rng.normal(size=(n_rows, 8, 3)) * (rng.uniform(0.3, 1.5, n_rows) * width)[:, None, None]
    right /= np.linalg.norm(right, axis=-1, keepdims=True)
    left = right * np.array([-1.0, 1.0, 1.0])
    sims = rng.uniform(0.1, 0.9, (n_rows, 8))
    log_w = np.concatenate([np.log(sims) + np.log1p(eps)[:, None], np.log(sims) + np.log1p(-eps)[:, None]], 1)
    log_kappa = np.repeat(log_kappa[:, None], 16, 1)
    return torch.from_numpy(log_w), torch.from_numpy(np.concatenate([right, left], 1)), torch.from_numpy(log_kappa)


def test_near_tie_of_two_modes_picks_the_heavier_like_the_reference():
    eps = np.geomspace(1e-7, 1e-2, 120)
    log_w, mu, log_kappa = _twin_clusters(120, eps, seed=11)
    assert_same_modes(log_w, mu, log_kappa, 2)
    top = mixture_modes(log_w, mu, log_kappa, 2, 8, 10_000)
    # p(y) - p(My) = 2 eps (g(y) - g(My)) for the mirror M and the unweighted cluster density g: the
    # maxima come in near-mirror pairs that differ by ~eps relative, the denser one first
    two_modes = (top[:, 0] - top[:, 1]).norm(dim=-1) > METRE_RAD
    assert two_modes.sum() > 60
    dens = log_mixture(log_w, mu, log_kappa, top)
    assert (dens[:, 0] >= dens[:, 1]).all()


def _arc_maximum(log_kappa: float, a: float) -> float:
    """The angle theta > 0 of the maxima (cos theta, +-sin theta, 0) of two equal components at
    (cos a, +-sin a, 0) beyond the bifurcation: bisection on the sign of d log p / d theta, positive on
    (0, theta) and negative beyond (float64; more precise than comparing values of log p, flat there)."""
    kappa = math.exp(log_kappa)

    def rising(theta: float) -> bool:
        # d log p / d theta = -kappa (r_1 sin(theta - a) + r_2 sin(theta + a))
        #                   = -kappa (sin theta cos a - cos theta sin a tanh(kappa sin a sin theta)), no cancellation
        return math.tan(theta) * math.cos(a) < math.sin(a) * math.tanh(kappa * math.sin(a) * math.sin(theta))

    lo, hi = 1e-9 * a, a
    assert rising(lo) and not rising(hi)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if rising(mid) else (lo, mid)
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("ratio", [0.9, 0.999, 0.999999, 1.0, 1.000001, 1.001, 1.1, 2.0])
def test_near_the_bifurcation_of_one_mode_into_two(ratio):
    # two equal components whose half-separation a solves kappa sin^2 a = ratio cos a: one mode at the
    # midpoint (1, 0, 0) for ratio <= 1 (flat to 4th order at ratio = 1, where the MM iteration converges
    # sublinearly), two symmetric ones at (cos theta, +-sin theta, 0) beyond: found to 1 m of a brute force
    log_kappas = (4.0, 10.0, 16.0)
    halves = [math.acos((-ratio + math.sqrt(ratio ** 2 + 4 * math.exp(lk) ** 2)) / (2 * math.exp(lk)))
              for lk in log_kappas]
    log_w = torch.full((3, 2), math.log(0.5), dtype=torch.float64)
    mu = torch.tensor([[[math.cos(a), math.sin(a), 0.0], [math.cos(a), -math.sin(a), 0.0]] for a in halves],
                      dtype=torch.float64)
    log_kappa = torch.tensor([[lk, lk] for lk in log_kappas], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged: no warning
        found = mixture_modes(log_w, mu, log_kappa, 1, 8, 10_000)[:, 0]
    for row, (lk, a) in enumerate(zip(log_kappas, halves)):
        theta = 0.0 if ratio <= 1 else _arc_maximum(lk, a)  # the midpoint by symmetry up to the bifurcation
        truth = torch.tensor([[math.cos(theta), s * math.sin(theta), 0.0] for s in (1, -1)], dtype=torch.float64)
        assert (truth - found[row]).norm(dim=-1).min() < METRE_RAD, (row, theta, found[row])


def test_not_converged_warns_with_rows_and_error():
    log_w, mu, log_kappa = knn_shaped(50, 9)
    with pytest.warns(RuntimeWarning, match=r"of 50 rows did not converge in 2 iterations \(estimated error up to"):
        mixture_modes(log_w, mu, log_kappa, 1, 8, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mixture_modes(log_w, mu, log_kappa, 1, 8, 10_000)
