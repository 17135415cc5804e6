"""Local maxima of vMF mixtures on the sphere (the density mode, paper eq. 6), shared by the mixture heads.

``mixture_modes`` climbs from several starts by the fixed-point iteration
y <- normalize(sum_i r_i(y) kappa_i mu_i) (r = posterior responsibilities, computed
in log space), an MM ascent: each step raises the density, so a start climbs to a
local maximum. Its convergence is linear and slow near a bifurcation of two modes
(rate -> 1: thousands of steps), and its steps are tiny where the density is nearly
flat (leaving a saddle, crossing a plateau: hundreds of steps). So once a start is
close to a maximum (the density is locally concave there and the step is short) it
takes safeguarded Newton steps on the sphere instead, which converge quadratically
to the same point, and where the density is not concave successive MM steps that
point the same way are stretched. Each (row, start) pair stops on its own. On the
knn head's val/test mixtures (16 components, one kappa) this is ~65 iterations of
~8 pairs per row instead of up to ~2300 iterations of every start of a row, 3-7x
less time; the maxima are those of the plain MM search to ~1 mm
(tests/heads/test_mixture_modes.py keeps that search as its reference).
Everything is float64: it resolves metres.
"""

from __future__ import annotations

import math
import warnings

import torch

from geo.geometry import EARTH_RADIUS_KM, logsumexp, normalize, softmax_and_logsumexp, vmf_log_normalizer

# A Newton or stretched step is at most this many kernel widths 1 / sqrt(kappa_eff) long
# (kappa_eff = the responsibility-weighted kappa): it stays near the maximum being climbed to,
# where the quadratic model of log p is good, rather than jumping towards another one (without
# the limit the search returns other maxima than the MM search on the tests' mixtures).
NEWTON_TRUST_WIDTHS = 0.25
# A Newton or stretched step that lowers log p by more than rounding (nats) is undone: the MM
# step from the same point is taken instead (an ascent), and that pair's later trial steps are
# limited to half the length, so the climb stays monotone.
ASCENT_SLACK_NATS = 1e-12


def _tangent_basis(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis ``[n, 3, 2]`` of the tangent plane at each unit vector ``y [n, 3]``."""
    # The coordinate axis least aligned with y is at least ~55 degrees from it: no cancellation.
    axis = torch.nn.functional.one_hot(y.abs().argmin(dim=-1), 3).to(y)
    e1 = normalize(axis - (axis * y).sum(-1, keepdim=True) * y)
    return torch.stack([e1, torch.linalg.cross(y, e1)], dim=-1)


def mixture_modes(log_weights: torch.Tensor, mu_xyz: torch.Tensor, log_kappa: torch.Tensor, k: int, n_starts: int,
                  max_iter: int, step_tol_rad: float = 1e-13, tol_rad: float = 1e-10,
                  start_index: torch.Tensor | None = None) -> torch.Tensor:
    """k highest local maxima of each row's vMF mixture, ``[B, k, 3]`` float64 unit vectors.

    ``log_weights [B, L]`` (log mixing weights; need not be normalised), ``mu_xyz [B, L, 3]``,
    ``log_kappa [B, L]``: each row's own L components, float64.

    Starts: the ``max(n_starts, 2k)`` component means where the *mixture* density is
    highest (not the highest own peak): a cluster of overlapping light components
    whose sum beats an isolated heavy one is then searched from inside the cluster.
    ``start_index [B, S]`` (indices into L) gives the starts instead, for callers that
    rank the means without the [B, L, L] matrix (the MvMF head, whose L reaches 2^15).
    Each (row, start) pair climbs on its own and stops on its own:

    - MM step (the fixed point above) by default; it stops when its step is below
      ``step_tol_rad`` or its estimated remaining distance to the fixed point,
      ``step * rho / (1 - rho)`` with rho the ratio of its last two steps, is below
      ``tol_rad`` (~0.6 mm).
    - Newton step on the sphere (tangent-plane gradient g and Riemannian Hessian H of
      log p, step -H^-1 g, retracted by normalising) where H is negative definite and
      the step is at most ``NEWTON_TRUST_WIDTHS`` kernel widths; it stops when the
      Newton step is below ``tol_rad`` (quadratic convergence: the distance left is far
      smaller).
    - Stretched MM step (x2, x4, ... up to the same length limit) where H is not
      negative definite and successive MM steps point the same way.

    A Newton or stretched step that lowers the density is undone (see ``ASCENT_SLACK_NATS``).

    Pairs still moving after ``max_iter`` iterations raise a ``RuntimeWarning`` naming
    their rows and the estimated error. Distinct maxima (further apart than ~1 m)
    come first; fewer than k distinct maxima are padded with repeats.
    """
    n_starts = max(n_starts, 2 * k)
    f64, device = torch.float64, log_weights.device
    lw, mu, lk = log_weights, normalize(mu_xyz), log_kappa
    n_rows, n_comp = lw.shape
    kappa = torch.exp(lk)
    log_base = lw + vmf_log_normalizer(lk)                               # [B, L] log weight + log normaliser

    if start_index is None:
        # The mixture's log density at each retained mean ([B, L]), by the float64 dot form
        # |a - b|^2 = 2 - 2 a.b (error ~1e-16 kappa nats: enough to rank starts).
        sq_chord_means = (2.0 - 2.0 * torch.einsum("bld,bmd->blm", mu, mu)).clamp_min(0.0)
        at_means = logsumexp(log_base[:, None, :] - 0.5 * kappa[:, None, :] * sq_chord_means, dim=-1)
        n_start = min(n_starts, n_comp)
        starts = torch.topk(at_means, n_start, dim=-1).indices           # [B, S]
    else:
        starts, n_start = start_index, start_index.shape[1]

    # One flat axis of (row, start) pairs [P = B S], so a pair stops as soon as it has converged.
    pair_row = torch.arange(n_rows, device=device).repeat_interleave(n_start)
    y = torch.gather(mu, 1, starts[..., None].expand(-1, -1, 3)).reshape(-1, 3).clone()  # [P, 3]
    n_pairs = y.shape[0]
    last_step = torch.full((n_pairs,), math.inf, dtype=f64, device=device)  # the last plain MM step (rad)
    error = torch.zeros(n_pairs, dtype=f64, device=device)              # estimated distance left (rad)
    prev_log_p = torch.full((n_pairs,), -math.inf, dtype=f64, device=device)  # log p where the last step began
    fallback = y.clone()                                                 # the MM point of the last step
    last_move = torch.zeros_like(y)                                      # the last step taken, y_new - y
    trial = torch.zeros(n_pairs, dtype=torch.bool, device=device)       # y came from a Newton or stretched step
    trust = torch.full((n_pairs,), NEWTON_TRUST_WIDTHS, dtype=f64, device=device)  # in kernel widths
    stretch = torch.ones(n_pairs, dtype=f64, device=device)             # factor on the next MM step
    eye = torch.eye(2, dtype=f64, device=device)
    active = torch.arange(n_pairs, device=device)                       # pairs still climbing
    for _ in range(max_iter):
        if active.numel() == 0:
            break
        rows, ya = pair_row[active], y[active]
        mu_a, kappa_a = mu[rows], kappa[rows]                            # [n, L, 3], [n, L]
        sq_chord = (ya[:, None, :] - mu_a).pow(2).sum(-1)                # [n, L]
        terms = log_base[rows] - 0.5 * kappa_a * sq_chord
        resp, log_p = softmax_and_logsumexp(terms, dim=-1)              # responsibilities [n, L], log p [n]
        # A trial step that went downhill: back to its start's MM point (an ascent), shorter
        # trials from now on, no update now.
        undo = trial[active] & (log_p < prev_log_p[active] - ASCENT_SLACK_NATS)
        r_kappa = resp * kappa_a
        m = torch.einsum("nl,nld->nd", r_kappa, mu_a)                    # gradient of log p in R^3
        y_mm = normalize(m)
        mm_move = y_mm - ya
        step = mm_move.norm(dim=-1)                                      # [n]
        rho = step / last_step[active]
        linear = (rho < 1) & torch.isfinite(last_step[active])          # no rate estimate after a trial step
        left = torch.where(linear, step * rho / (1 - rho), torch.full_like(step, math.inf))

        # Newton on the sphere in tangent coordinates t = E^T mu_i: g = E^T m and
        # H = sum_i r_i kappa_i^2 t_i t_i^T - g g^T - (y.m) I (the Hessian of log p in R^3,
        # projected, plus the curvature term of the sphere).
        basis = _tangent_basis(ya)                                       # [n, 3, 2]
        t = torch.einsum("nld,nde->nle", mu_a, basis)                    # [n, L, 2]
        g = torch.einsum("nd,nde->ne", m, basis)                         # [n, 2]
        h = torch.einsum("nl,nle,nlf->nef", r_kappa * kappa_a, t, t) - g[:, :, None] * g[:, None, :]
        h = h - (ya * m).sum(-1)[:, None, None] * eye
        h00, h01, h11 = h[:, 0, 0], h[:, 0, 1], h[:, 1, 1]
        det = h00 * h11 - h01 * h01
        concave = (h00 < 0) & (det > 0)
        safe_det = torch.where(concave, det, torch.ones_like(det))
        v = -torch.stack([h11 * g[:, 0] - h01 * g[:, 1], h00 * g[:, 1] - h01 * g[:, 0]], dim=-1) / safe_det[:, None]
        newton_len = v.norm(dim=-1)
        reach = trust[active] * r_kappa.sum(-1).rsqrt()                  # trust x 1 / sqrt(kappa_eff), rad
        newton = concave & (newton_len <= reach) & ~undo
        y_nt = normalize(ya + torch.einsum("nde,ne->nd", basis, v))
        # Where log p is not concave (leaving a saddle, crossing a plateau) the MM step can be
        # ~1e-3 kernel widths for hundreds of steps: while successive steps point the same
        # way, stretch them (x2 each time, at most ``reach`` long).
        straight = (mm_move * last_move[active]).sum(-1) > 0.99 * step * last_move[active].norm(dim=-1)
        factor = torch.where(straight & ~concave & ~undo, 2.0 * stretch[active], torch.ones_like(step))
        factor = torch.minimum(factor, (reach / step.clamp_min(1e-300)).clamp_min(1.0))
        stretched = factor > 1
        y_st = normalize(ya + factor[:, None] * mm_move)

        done = ~undo & torch.where(newton, newton_len <= tol_rad, (step <= step_tol_rad) | (left <= tol_rad))
        y_next = torch.where(undo[:, None], fallback[active],
                             torch.where(newton[:, None], y_nt, torch.where(stretched[:, None], y_st, y_mm)))
        y[active] = y_next
        last_move[active] = y_next - ya
        fallback[active] = y_mm
        prev_log_p[active] = log_p
        trial[active] = newton | stretched
        trust[active] = torch.where(undo, 0.5 * trust[active], trust[active])
        stretch[active] = torch.where(undo, torch.ones_like(factor), factor)
        last_step[active] = torch.where(newton | stretched | undo, torch.full_like(step, math.inf), step)
        error[active] = torch.where(done, torch.zeros_like(left),
                                    torch.where(newton, newton_len, torch.where(linear, left, step)))
        active = active[~done]
    if active.numel():
        n_bad = pair_row[active].unique().numel()
        warnings.warn(f"vMF mixture mode search: {n_bad} of {n_rows} rows did not converge in {max_iter} "
                      f"iterations (estimated error up to {float(error[active].max()) * EARTH_RADIUS_KM * 1e3:.3g} m; "
                      f"raise max_iter)", RuntimeWarning, stacklevel=3)
    y = y.reshape(n_rows, n_start, 3)
    sq_chord = (y[:, :, None, :] - mu[:, None, :, :]).pow(2).sum(-1)     # [B, S, L]
    log_dens = logsumexp(log_base[:, None, :] - 0.5 * kappa[:, None, :] * sq_chord, dim=-1)  # [B, S]
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
