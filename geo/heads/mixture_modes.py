"""Local maxima of vMF mixtures on the sphere (the density mode, paper eq. 6), shared by the mixture heads.

``mixture_modes`` runs the fixed-point iteration y <- normalize(sum_i r_i(y) kappa_i mu_i)
(r = posterior responsibilities, computed in log space), an MM ascent: each start
climbs monotonically to a local maximum. Everything is float64: it resolves metres.
"""

from __future__ import annotations

import math
import warnings

import torch

from geo.geometry import EARTH_RADIUS_KM, normalize, vmf_log_normalizer


def mixture_modes(log_weights: torch.Tensor, mu_xyz: torch.Tensor, log_kappa: torch.Tensor, k: int, n_starts: int,
                  max_iter: int, step_tol_rad: float = 1e-13, tol_rad: float = 1e-10) -> torch.Tensor:
    """k highest local maxima of each row's vMF mixture, ``[B, k, 3]`` float64 unit vectors.

    ``log_weights [B, L]`` (log mixing weights; need not be normalised), ``mu_xyz [B, L, 3]``,
    ``log_kappa [B, L]``: each row's own L components, float64.

    Starts: the ``max(n_starts, 2k)`` component means where the *mixture* density is
    highest (not the highest own peak): a cluster of overlapping light components
    whose sum beats an isolated heavy one is then searched from inside the cluster.
    Convergence: a start stops when its step is below ``step_tol_rad`` or its
    estimated remaining distance to the fixed point, ``step * rho / (1 - rho)`` with
    rho the ratio of its last two steps (the iteration converges linearly, slowly
    near a bifurcation of two modes), is below ``tol_rad`` (~0.6 mm). Rows still
    moving after ``max_iter`` iterations raise a ``RuntimeWarning`` naming them and
    the estimated error; only unconverged rows keep iterating, so the long tail is cheap.
    Distinct maxima (further apart than ~1 m) come first; fewer than k distinct
    maxima are padded with repeats.
    """
    n_starts = max(n_starts, 2 * k)
    f64, device = torch.float64, log_weights.device
    lw, mu, lk = log_weights, normalize(mu_xyz), log_kappa
    n_comp = lw.shape[1]
    kappa = torch.exp(lk)
    kappa_mu = kappa[..., None] * mu                                     # [B, L, 3]
    log_norm = vmf_log_normalizer(lk)                                    # [B, L]

    def log_terms(y: torch.Tensor, rows=slice(None)) -> torch.Tensor:   # y [b, S, 3] -> [b, S, L]
        sq_chord = (y[:, :, None, :] - mu[rows, None, :, :]).pow(2).sum(-1)
        return (lw[rows] + log_norm[rows])[:, None, :] - 0.5 * kappa[rows, None, :] * sq_chord

    # The mixture's log density at each retained mean ([B, L]), by the float64 dot form
    # |a - b|^2 = 2 - 2 a.b (error ~1e-16 kappa nats: enough to rank starts).
    sq_chord_means = (2.0 - 2.0 * torch.einsum("bld,bmd->blm", mu, mu)).clamp_min(0.0)
    at_means = torch.logsumexp((lw + log_norm)[:, None, :] - 0.5 * kappa[:, None, :] * sq_chord_means, dim=-1)
    n_start = min(n_starts, n_comp)
    starts = torch.topk(at_means, n_start, dim=-1).indices               # [B, S]
    y = torch.gather(mu, 1, starts[..., None].expand(-1, -1, 3)).clone()
    active = torch.arange(y.shape[0], device=device)                    # rows still iterating
    last_step = torch.full(y.shape[:2], math.inf, dtype=f64, device=device)
    error = torch.zeros(y.shape[:2], dtype=f64, device=device)          # estimated distance left (rad)
    for _ in range(max_iter):
        if active.numel() == 0:
            break
        ya = y[active]
        resp = torch.softmax(log_terms(ya, active), dim=-1)              # responsibilities, in log space
        y_new = normalize(torch.einsum("bsl,bld->bsd", resp, kappa_mu[active]))
        step = (y_new - ya).norm(dim=-1)                                 # [b, S]
        rho = step / last_step[active]
        linear = (rho < 1) & torch.isfinite(last_step[active])          # no rate estimate on the first step
        left = torch.where(linear, step * rho / (1 - rho), torch.full_like(step, math.inf))
        done = (step <= step_tol_rad) | (left <= tol_rad)
        y[active], last_step[active] = y_new, step
        error[active] = torch.where(done, torch.zeros_like(left), torch.where(linear, left, step))
        active = active[~done.all(dim=-1)]
    if active.numel():
        warnings.warn(f"vMF mixture mode search: {active.numel()} of {y.shape[0]} rows did not converge in {max_iter} "
                      f"iterations (estimated error up to {float(error[active].max()) * EARTH_RADIUS_KM * 1e3:.3g} m; "
                      f"raise max_iter)", RuntimeWarning, stacklevel=3)
    log_dens = torch.logsumexp(log_terms(y), dim=-1)                     # [B, S]
    # Rank by density, putting repeats of an earlier (higher) maximum last.
    order = torch.argsort(log_dens, dim=-1, descending=True)
    y = torch.gather(y, 1, order[..., None].expand(-1, -1, 3))
    close = (y[:, :, None, :] - y[:, None, :, :]).norm(dim=-1) < 1.6e-7  # ~1 m on the earth
    earlier = torch.tril(torch.ones(n_start, n_start, dtype=torch.bool, device=device), diagonal=-1)
    repeat = (close & earlier).any(dim=-1)                               # [B, S]
    rank = repeat.to(f64) * n_start + torch.arange(n_start, device=device, dtype=f64)
    pick = torch.argsort(rank, dim=-1)[:, :k]
    if pick.shape[1] < k:  # k > n_components: fewer starts than k
        pick = torch.cat([pick, pick[:, :1].expand(-1, k - pick.shape[1])], dim=1)
    return torch.gather(y, 1, pick[..., None].expand(-1, -1, 3))
