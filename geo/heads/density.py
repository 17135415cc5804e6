"""Sampling from heads' densities, and the calibration of a density at a true location.

Everything here works on the two forms a head's density takes (``geo.heads.base``):

- a **vMF mixture** per row: ``log_w [B, K]`` (normalised), unit means ``mu [B, K, 3]``,
  ``log_kappa [B, K]`` (MvMF, vmf, vmf-mixture, knn's kernel density, regression);
- **cell probabilities** ``probs [B, c]`` over a partition, each cell's mass spread
  uniformly over its area (softmax, softmax-hier).

Sampling (float64, on the CPU, reproducible from a ``torch.Generator``):

- vMF (Wood 1994): the cosine to the mean is w = 1 - t with
  t = -log1p((1 - u) expm1(-2 kappa)) / kappa, u ~ U[0, 1): the inverse of the closed-form
  law of 1 - mu.y, written so that it is exact from kappa = 1e-6 (t -> 2(1 - u), uniform)
  to 1e9 (t -> -log(1 - u) / kappa, no cancellation); the tangent part has length
  sqrt(t (2 - t)) at a uniform azimuth;
- cells: a cell from ``probs``, then (S2 partitions) one of its S2 pieces in proportion to
  area, then a uniform point of that piece by rejection from the smallest cap around the
  piece's centre that holds its four vertices (S2 cell edges are great circles, so the
  cell is convex and lies in that cap; acceptance >= ~64 %). A partition without S2
  pieces is sampled by rejection from the whole sphere with its own ``assign``.

The **HPD level** of a true location y is the mass of the density where it is higher than
at y: 0 = y at the mode, 1 = y where the density is lowest. Under a correctly specified
model it is uniform on [0, 1], so the fraction of test images with level <= a is the
coverage of the a-credible (highest-density) region. Computed

- in closed form for a single vMF: (1 - e^(-kappa s)) / (1 - e^(-2 kappa)), s = 1 - mu.y = |y - mu|^2 / 2;
- exactly for cell densities: the mass of the cells of higher density (p_j / area_j) plus
  U times the mass of cells of equal density (y's own cell), U ~ U[0, 1). The density is
  constant on a cell, so "higher than at y" leaves y's cell undecided; the uniform share
  is the randomised level that is exactly uniform under a correct model (the boundary
  cell of a region at level a holds only part of its mass);
- otherwise by Monte Carlo from the head's own n samples Y_i: mean(p(Y_i) > p(y)) (+ the
  same tie rule), standard error sqrt(h (1 - h) / n) <= 0.5 / sqrt(n): 0.01 at n = 2500.

The **area of the credible region** at level a (the smallest region holding mass a, i.e.
{p >= t_a}) is, in steradians (times R^2 for km^2):

- single vMF: a cap with 1 - cos r = u_a = -log1p(a expm1(-2 kappa)) / kappa, area 2 pi u_a;
- cells: the densest cells until their mass reaches a, the last one in part;
- Monte Carlo: area = E_p[1{p(Y) >= t_a} / p(Y)] estimated from the same samples
  (importance sampling with p itself: on the region 1 / p <= 1 / t_a, so the estimate
  has bounded variance even for regions of a few km^2, which uniform points would miss),
  t_a the (1 - a) quantile of the samples' log-densities. Its standard error per row, by
  the influence function of this quantile-truncated mean, is sd_p((1/p - 1/t_a) 1{p >= t_a}) / sqrt(n)
  (zero where the density is flat inside the region, since the sample threshold then moves
  mass and area in step), estimated from the same samples by ``monte_carlo_area_se``. For a
  vMF with kappa >> 1 it is 1.05 % of the area at a = 0.5 and 3.2 % at a = 0.95 for n = 2500
  (closed form; tests/heads/test_density.py checks the estimate against the spread over
  repeats). The median area over a test set's rows, which the metrics report, varies less.
"""

from __future__ import annotations

import math
import weakref
from typing import Sequence

import numpy as np
import torch

LOG_4PI = math.log(4.0 * math.pi)
DEFAULT_SAMPLES = 2500  # Monte Carlo standard error of an HPD level <= 0.5 / sqrt(2500) = 0.01
CREDIBLE_LEVELS = (0.5, 0.95)  # the credible regions whose areas are measured (sharpness)
_MAX_REJECTION_ROUNDS = 200


def numpy_rng(generator: torch.Generator | None) -> np.random.Generator:
    """A numpy generator drawn from ``generator`` (so one torch seed makes every draw reproducible)."""
    seed = torch.randint(0, 2**62, (1,), generator=generator).item()
    return np.random.default_rng(seed)


def _frames(mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two unit vectors ``e1, e2 [..., 3]`` completing each unit ``mu [..., 3]`` to an orthonormal frame."""
    a = torch.zeros_like(mu)
    use_y = mu[..., 0].abs() > 0.9
    a[..., 0] = (~use_y).to(mu.dtype)
    a[..., 1] = use_y.to(mu.dtype)
    e1 = a - (a * mu).sum(-1, keepdim=True) * mu
    e1 = e1 / torch.linalg.vector_norm(e1, dim=-1, keepdim=True)
    return e1, torch.linalg.cross(mu, e1, dim=-1)


def _around(mu: torch.Tensor, t: torch.Tensor, phi: torch.Tensor, frames=None) -> torch.Tensor:
    """Points at 1 - cos(angle) = ``t`` from unit ``mu [..., 3]`` at azimuth ``phi`` (all broadcast).

    ``frames``: ``_frames(mu)`` when already at hand. Unit length to ~1e-16: (1 - t)^2 + t (2 - t) = 1.
    """
    e1, e2 = _frames(mu) if frames is None else frames
    radial = torch.sqrt((t * (2.0 - t)).clamp_min(0.0))
    return (1.0 - t)[..., None] * mu + (radial * torch.cos(phi))[..., None] * e1 + \
        (radial * torch.sin(phi))[..., None] * e2


def sample_vmf(mu: torch.Tensor, log_kappa: torch.Tensor, generator: torch.Generator | None = None,
               frames: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One exact draw from vMF(mu, kappa) per element: ``mu [..., 3]``, ``log_kappa [...]`` -> ``[..., 3]`` float64.

    Wood's method with the stable inverse law of 1 - mu.y (module docstring); exact for kappa in [1e-6, 1e9].
    ``frames``: ``_frames(mu)`` when already at hand (unit ``mu``).
    """
    mu = torch.as_tensor(mu, dtype=torch.float64).cpu()
    if frames is None:
        mu = mu / torch.linalg.vector_norm(mu, dim=-1, keepdim=True)
    kappa = torch.exp(torch.as_tensor(log_kappa, dtype=torch.float64).cpu())
    one_minus_u = 1.0 - torch.rand(kappa.shape, dtype=torch.float64, generator=generator)  # (0, 1]
    t = (-torch.log1p(one_minus_u * torch.expm1(-2.0 * kappa)) / kappa).clamp(0.0, 2.0)
    phi = 2.0 * math.pi * torch.rand(kappa.shape, dtype=torch.float64, generator=generator)
    return _around(mu, t, phi, frames)


def sample_vmf_mixture(log_w: torch.Tensor, mu: torch.Tensor, log_kappa: torch.Tensor, n: int,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """n draws per row of a vMF mixture: ``log_w [B, K], mu [B, K, 3], log_kappa [B, K]`` -> ``[B, n, 3]`` float64."""
    log_w = torch.as_tensor(log_w, dtype=torch.float64).cpu()
    b = log_w.shape[0]
    if b == 0 or n == 0:
        return torch.zeros((b, n, 3), dtype=torch.float64)
    probs = torch.softmax(log_w, dim=-1)
    comp = torch.multinomial(probs, n, replacement=True, generator=generator)                # [B, n]
    mu = torch.as_tensor(mu, dtype=torch.float64).cpu()
    mu = mu / torch.linalg.vector_norm(mu, dim=-1, keepdim=True)
    e1, e2 = _frames(mu)                                        # once per component, not per draw
    log_kappa = torch.as_tensor(log_kappa, dtype=torch.float64).cpu().expand(b, -1)
    index = comp[..., None].expand(-1, -1, 3)
    mu_s, e1_s, e2_s = (torch.gather(v.expand(b, -1, 3), 1, index) for v in (mu, e1, e2))
    return sample_vmf(mu_s, torch.gather(log_kappa, 1, comp), generator, frames=(e1_s, e2_s))


# ---- cells -----------------------------------------------------------------------------------

_CELL_GEOMETRY: dict[int, tuple] = {}  # id(partition) -> (weakref to it, geometry); partitions are unhashable


def _piece_geometry(partition) -> dict:
    """The S2 pieces of ``partition``: centres, bounding caps, leaf-id ranges, and the cell -> piece lookup."""
    hit = _CELL_GEOMETRY.get(id(partition))
    if hit is not None and hit[0]() is partition:
        return hit[1]
    from geo.sphere import s2cells

    ids = np.asarray(partition.piece_ids, np.uint64)
    cells = np.asarray(partition.piece_cells, np.int64)
    centres = s2cells.cell_centres_xyz(ids)
    vertices = s2cells.cell_vertices_xyz(ids)                                    # [m, 4, 3]
    chord2 = ((vertices - centres[:, None, :]) ** 2).sum(-1).max(axis=1)         # squared chord to the farthest
    cap_t = np.minimum(0.5 * chord2 * (1.0 + 1e-9) + 1e-15, 2.0)                 # 1 - cos(cap radius), a margin
    area = s2cells.cell_areas_sr(ids)
    order = np.argsort(cells, kind="stable")
    share = area[order] / np.bincount(cells, weights=area, minlength=partition.n_cells)[cells[order]]
    # keys: cell + cumulative share of its area inside the cell, increasing; cell + u (u ~ U[0,1)) finds a piece.
    cum = np.zeros(len(order))
    for start in np.flatnonzero(np.r_[True, cells[order][1:] != cells[order][:-1]]):
        end = start + 1
        while end < len(order) and cells[order][end] == cells[order][start]:
            end += 1
        cum[start:end] = np.cumsum(share[start:end])
        cum[end - 1] = 1.0
    geometry = dict(order=order, keys=cells[order] + cum, centres=centres, cap_t=cap_t,
                    lo=s2cells.range_min(ids), hi=ids + (ids - s2cells.range_min(ids)))
    _CELL_GEOMETRY[id(partition)] = (weakref.ref(partition), geometry)
    return geometry


def _uniform_on_sphere(n: int, rng: np.random.Generator) -> np.ndarray:
    z = rng.uniform(-1.0, 1.0, n)
    phi = rng.uniform(0.0, 2.0 * math.pi, n)
    r = np.sqrt(1.0 - z * z)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=-1)


def sample_cells(probs: torch.Tensor, partition, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n draws per row of a density constant on cells: ``probs [B, c]`` -> ``[B, n, 3]`` float64 (module docstring)."""
    probs = torch.as_tensor(probs, dtype=torch.float64).cpu()
    b = probs.shape[0]
    if b == 0 or n == 0:
        return torch.zeros((b, n, 3), dtype=torch.float64)
    cells = torch.multinomial(probs, n, replacement=True, generator=generator).numpy().reshape(-1)
    rng = numpy_rng(generator)
    out = np.empty((len(cells), 3))
    if getattr(partition, "piece_ids", None) is not None:
        from geo.sphere import s2cells

        geo = _piece_geometry(partition)
        piece = geo["order"][np.minimum(np.searchsorted(geo["keys"], cells + rng.uniform(0.0, 1.0, len(cells)),
                                                        side="right"), len(geo["order"]) - 1)]
        todo = np.arange(len(cells))
        for _ in range(_MAX_REJECTION_ROUNDS):
            p = piece[todo]
            t = rng.uniform(0.0, 1.0, len(todo)) * geo["cap_t"][p]
            phi = rng.uniform(0.0, 2.0 * math.pi, len(todo))
            xyz = _around(torch.from_numpy(geo["centres"][p]), torch.from_numpy(t), torch.from_numpy(phi)).numpy()
            leaf = s2cells.xyz_to_leaf_ids(xyz)
            inside = (leaf >= geo["lo"][p]) & (leaf <= geo["hi"][p])
            out[todo[inside]] = xyz[inside]
            todo = todo[~inside]
            if not len(todo):
                break
    else:  # a partition given only by its assign(): uniform proposals on the sphere
        todo = np.arange(len(cells))
        for _ in range(_MAX_REJECTION_ROUNDS):
            xyz = _uniform_on_sphere(len(todo), rng)
            lat = np.degrees(np.arctan2(xyz[:, 2], np.hypot(xyz[:, 0], xyz[:, 1])))
            lon = np.degrees(np.arctan2(xyz[:, 1], xyz[:, 0]))
            inside = np.asarray(partition.assign(lat, (lon + 180.0) % 360.0 - 180.0)) == cells[todo]
            out[todo[inside]] = xyz[inside]
            todo = todo[~inside]
            if not len(todo):
                break
    if len(todo):
        raise RuntimeError(f"cell sampling: {len(todo)} points not placed after {_MAX_REJECTION_ROUNDS} rounds")
    return torch.from_numpy(out).view(b, n, 3)


# ---- HPD levels and credible areas -------------------------------------------------------------

def vmf_hpd_level(mu: torch.Tensor, log_kappa: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Closed-form HPD level of points ``y [B, 3]`` under vMF(mu [B, 3], kappa [B]): ``[B]`` float64."""
    mu, y = (torch.as_tensor(v, dtype=torch.float64).cpu() for v in (mu, y))
    mu = mu / torch.linalg.vector_norm(mu, dim=-1, keepdim=True)
    y = y / torch.linalg.vector_norm(y, dim=-1, keepdim=True)
    kappa = torch.exp(torch.as_tensor(log_kappa, dtype=torch.float64).cpu())
    s = 0.5 * (y - mu).pow(2).sum(-1)                                         # 1 - mu.y, exact for nearby points
    return (torch.expm1(-kappa * s) / torch.expm1(-2.0 * kappa)).clamp(0.0, 1.0)


def vmf_credible_area_sr(log_kappa: torch.Tensor, levels: Sequence[float]) -> torch.Tensor:
    """Area (sr) of the a-credible cap of vMF(kappa [B]) for each level: ``[B, L]`` float64."""
    kappa = torch.exp(torch.as_tensor(log_kappa, dtype=torch.float64).cpu())[:, None]
    a = torch.as_tensor(levels, dtype=torch.float64)[None, :]
    u = -torch.log1p(a * torch.expm1(-2.0 * kappa)) / kappa
    return 2.0 * math.pi * u.clamp(0.0, 2.0)


def cell_hpd(log_probs: torch.Tensor, log_areas_sr: torch.Tensor, cell: torch.Tensor, levels: Sequence[float],
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact HPD levels ``[B]`` of the true cells ``cell [B]`` and credible areas ``[B, L]`` (sr) of cell densities.

    ``log_probs [B, c]`` (normalised), ``log_areas_sr [c]``; float64 results (module docstring).
    """
    log_p = torch.as_tensor(log_probs, dtype=torch.float64).cpu()
    log_a = torch.as_tensor(log_areas_sr, dtype=torch.float64).cpu()
    cell = torch.as_tensor(cell, dtype=torch.int64).cpu()
    p = torch.exp(log_p)
    dens = log_p - log_a[None, :]
    at = dens.gather(1, cell[:, None])
    higher = (p * (dens > at)).sum(1)
    equal = (p * (dens == at)).sum(1)
    u = torch.rand(len(cell), dtype=torch.float64, generator=generator)
    hpd = (higher + u * equal).clamp(0.0, 1.0)
    order = torch.argsort(dens, dim=1, descending=True)
    p_sorted = torch.gather(p, 1, order)
    a_sorted = torch.exp(log_a)[order]
    cum_p = torch.cumsum(p_sorted, 1)
    cum_a = torch.cumsum(a_sorted, 1)
    areas = []
    for level in levels:
        j = torch.searchsorted(cum_p, torch.full((len(cell), 1), float(level), dtype=torch.float64)).clamp(
            max=p.shape[1] - 1)                                                 # the boundary cell
        before_p = (cum_p.gather(1, j) - p_sorted.gather(1, j))
        before_a = (cum_a.gather(1, j) - a_sorted.gather(1, j))
        part = ((level - before_p) / p_sorted.gather(1, j).clamp_min(1e-300)).clamp(0.0, 1.0)
        areas.append((before_a + part * a_sorted.gather(1, j))[:, 0])
    return hpd, torch.stack(areas, dim=1)


def monte_carlo_area_se(log_density_samples: torch.Tensor, levels: Sequence[float]) -> torch.Tensor:
    """Standard errors ``[B, L]`` (sr) of ``monte_carlo_hpd``'s credible areas, from the same samples.

    ``log_density_samples [B, n]``: log p at n draws from each row's own p. The influence-function
    estimate sd((1/p - 1/t_a) 1{p >= t_a}) / sqrt(n) of the module docstring, float64.
    """
    lp = torch.as_tensor(log_density_samples, dtype=torch.float64).cpu()
    n = lp.shape[1]
    inv_p = torch.exp(-torch.sort(lp, dim=1, descending=True).values)
    out = []
    for level in levels:
        m = min(n, max(1, int(math.ceil(float(level) * n))))
        term = torch.zeros_like(inv_p)
        term[:, :m] = inv_p[:, :m] - inv_p[:, m - 1:m]              # 1/p - 1/t on the m densest samples
        out.append(term.std(dim=1) / math.sqrt(n))
    return torch.stack(out, dim=1)


def monte_carlo_hpd(log_density_at_y: torch.Tensor, log_density_samples: torch.Tensor, levels: Sequence[float],
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """HPD levels ``[B]`` and credible areas ``[B, L]`` (sr) from n samples of each row's own density.

    ``log_density_at_y [B]``: log p at the true points; ``log_density_samples [B, n]``: log p at n
    draws from p. Float64 results (module docstring: tie rule, importance-sampled areas).
    """
    at = torch.as_tensor(log_density_at_y, dtype=torch.float64).cpu()[:, None]
    lp = torch.as_tensor(log_density_samples, dtype=torch.float64).cpu()
    n = lp.shape[1]
    higher = (lp > at).double().mean(1)
    equal = (lp == at).double().mean(1)
    u = torch.rand(lp.shape[0], dtype=torch.float64, generator=generator)
    hpd = higher + u * equal
    lp_sorted = torch.sort(lp, dim=1, descending=True).values
    inv_p = torch.exp(-lp_sorted)
    cum = torch.cumsum(inv_p, dim=1) / n
    areas = []
    for level in levels:
        m = min(n, max(1, int(math.ceil(float(level) * n))))                 # the m densest samples: mass ~ level
        areas.append(cum[:, m - 1])
    return hpd, torch.stack(areas, dim=1).clamp(max=4.0 * math.pi)

