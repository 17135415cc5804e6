"""The Mixture of von Mises-Fisher head (Izbicki et al. 2019, eq. 1-7).

    MvMF(y | x) = sum_i Gamma_i(x) vMF(y; mu_i, kappa_i),   Gamma = softmax(W x + b)

over c components, one per partition cell. Parameters: W [c, d] (Glorot) and
b [c] (zero) in ``linear``; ``mu_raw [c, 3]`` stored unconstrained and
normalised wherever it is used (initialised at the cell centres, or the cells'
training-point means with ``mu_init="mean"``); ``log_kappa [c]`` initialised
at ``kappa0`` (default 16.0, i.e. kappa = e^16, ~2.5 km half-mass radius).

Numerics (see shared/PAPER.md): no sinh anywhere (``geometry.vmf_log_normalizer``),
and the mixture is combined with logsumexp, so a point 20,000 km from every
component at kappa = e^16 still has a finite loss and gradient. The [B, c]
matrix of log vMF terms is one float64 product ``[y, 1] @ [kappa mu, log C - kappa].T``
(= log C - kappa |y - mu|^2 / 2 for unit vectors, exact to ~1e-16 kappa nats: 1e-9
at kappa = e^16), then rounded to float32 for the logsumexp. That is ~5x less
memory traffic than the [B, c, 3] differences of ``geometry.vmf_log_density_pairwise``
(measured: MvMF loss+backward 2.4 s vs 6.6 s at B = 2048, c = 2^15 on 2 cores); the
difference form remains the fallback on MPS, which has no float64. In float32
the factored form would be the "kappa (mu.y - 1)" pitfall: it must stay float64.
The loss (``log_density_at``) is one autograd Function, ``geo.heads.mvmf_loss``:
rows in cache-sized chunks of reused buffers, softmax(logits + log vMF) and
softmax(logits) kept for backward (two [B, c] tensors: the trainer's chunking
bounds B), so each element is exponentiated twice per step and backward is one
float64 product (see that module). On MPS the loss
falls back to autograd on the difference form, checkpointed per chunk.

Shapes and units: features ``[B, d]``, logits ``[B, c]``, points are unit
vectors ``[..., 3]``, densities are log probability per steradian (nats),
predictions are degrees ``(lat_deg [B, k], lon_deg [B, k])`` as float64
CPU tensors (float64 exists on every device's host; predictions go to disk).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from geo.errors import ConfigError
from geo.geometry import logsumexp, normalize, vmf_log_density_pairwise, vmf_log_normalizer, xyz_to_latlon
from geo.heads.base import CellHead, VmfMixture
from geo.heads.low_precision import matmul_dtype_of
from geo.heads.mixture_modes import mixture_modes
from geo.heads.mixture_points import NeighbourLists, log_density_points, neighbour_lists
from geo.heads.mixture_reach import ReachGraph, mode_support, reach_graph
from geo.heads.mvmf_loss import mvmf_log_density_at
from geo.heads.registry import register_head
from geo.heads.trunk import trunk_options_of

MU_INITS = ("centre", "mean")
NEGLECT_WEIGHT = 1e-9  # log_density_rows drops each row's lightest components summing to at most this weight


def _log_vmf_operands(y: torch.Tensor, mu: torch.Tensor, log_kappa: torch.Tensor):
    """Factors of the [b, c] log vMF matrix: ``lhs [b, 4] @ rhs [c, 4].T = log vMF(y_b; mu_i, kappa_i)``.

    For unit vectors log vMF = log C(kappa) - kappa + kappa (mu . y), i.e. lhs = [y, 1],
    rhs = [kappa mu, log C - kappa]: one K = 4 matmul instead of a [b, c, 3] difference
    tensor (~5x less memory traffic in forward and backward). In float64 its error is
    ~1e-16 kappa nats (1e-9 at kappa = e^16, 1e-7 at 1e9), which is why it must be float64;
    the float32 version of this form is the pitfall PAPER.md warns about. Inputs are
    float64 unit vectors.
    """
    kappa = torch.exp(log_kappa)
    rhs = torch.cat([kappa[:, None] * mu, (vmf_log_normalizer(log_kappa) - kappa)[:, None]], dim=1)
    lhs = torch.cat([y, torch.ones_like(y[:, :1])], dim=1)
    return lhs, rhs


def _mixture_row_log_density_diff(logits: torch.Tensor, y: torch.Tensor, mu: torch.Tensor,
                                  log_kappa: torch.Tensor) -> torch.Tensor:
    """Row log-densities ``[b]`` by squared-chord differences, for devices without float64 (MPS)."""
    log_vmf = vmf_log_density_pairwise(y, mu, log_kappa)
    return torch.logsumexp(logits + log_vmf, dim=-1) - torch.logsumexp(logits, dim=-1)


@register_head("mvmf")
class MvMFHead(CellHead):
    """Mixture of von Mises-Fisher output layer over the cells of ``partition``.

    Args:
        feature_dim: d, the width of the features.
        partition: object with ``centres_xyz [c, 3]``, ``means_xyz [c, 3]`` (float64 unit vectors).
        kappa0: initial log kappa of every component (16.0 -> kappa = e^16).
        train_mu, train_kappa: train the means / concentrations (False freezes them:
            ``requires_grad=False``).
        mu_init: "centre" (the paper's) or "mean" (the cells' training-point means).
        matmul_dtype: None or bfloat16, for the W x product only.
    """

    has_density = True
    predict_modes = ("argmax", "mode")
    sweep_options = {"kappa0": "k"}  # runs mvmf-c<C>-k<kappa0>
    shared_components = True  # mu and kappa are parameters, the same for every input (drawn in reports)
    # Bound on the [rows, c]-sized temporaries of one chunk; an attribute, not an
    # option, because it changes memory use, not results.
    max_chunk_bytes: int = 256 * 2**20

    def __init__(self, feature_dim: int, partition: Any, *, kappa0: float = 16.0, train_mu: bool = True,
                 train_kappa: bool = True, mu_init: str = "centre", matmul_dtype: Any = None,
                 trunk_width: int = 512, trunk_depth: int = 0):
        centres = torch.as_tensor(partition.centres_xyz, dtype=torch.float64)
        super().__init__(feature_dim, centres.shape[0], matmul_dtype, trunk_width, trunk_depth)
        if mu_init not in MU_INITS:
            raise ConfigError(f"mu_init must be one of {', '.join(MU_INITS)}, not {mu_init!r}")
        if not math.isfinite(float(kappa0)):
            raise ConfigError(f"kappa0 (log kappa) must be finite, not {kappa0!r}")
        init = centres if mu_init == "centre" else torch.as_tensor(partition.means_xyz, dtype=torch.float64)
        self.mu_raw = nn.Parameter(normalize(init).to(torch.float32), requires_grad=bool(train_mu))
        self.log_kappa = nn.Parameter(torch.full((self.n_cells,), float(kappa0)), requires_grad=bool(train_kappa))
        self.options = {"kappa0": float(kappa0), "train_mu": bool(train_mu), "train_kappa": bool(train_kappa),
                        "mu_init": mu_init, "matmul_dtype": self.matmul_dtype_name, **self.trunk_options()}

    @classmethod
    def options_from_config(cls, config: dict) -> dict:
        return dict(kappa0=config["kappa0"], train_mu=config["train_mu"], train_kappa=config["train_kappa"],
                    mu_init=config["mu_init"], matmul_dtype=matmul_dtype_of(config), **trunk_options_of(config))

    @classmethod
    def parameter_count(cls, feature_dim: int, n_cells: int) -> int:
        return super().parameter_count(feature_dim, n_cells) + 4 * n_cells  # + mu [c, 3], log kappa [c]

    def vmf_mixture(self, output_row: torch.Tensor) -> VmfMixture:
        """The row's mixture: log Gamma [c] from the logits [c], float64 means [c, 3] and log kappa [c]."""
        with torch.no_grad():
            return VmfMixture(torch.log_softmax(torch.as_tensor(output_row).detach().double().cpu(), dim=-1),
                              self.mu_float64(), self.log_kappa.detach().double().cpu())

    def mu_float64(self) -> torch.Tensor:
        """Unit means ``[c, 3]`` normalised in float64 on the CPU, as the loss's float64 terms use them.

        (``mu()`` normalises in the head's dtype: from a float32 head, means ~1e-8 off unit
        length, which at kappa = e^16 moves a density by ~1e-4 nats.)"""
        return normalize(self.mu_raw.detach().to("cpu", torch.float64))

    def mixture_parts(self, logits: torch.Tensor):
        """``(log Gamma [B, c], mu [1, c, 3], log kappa [1, c])`` float64 on the CPU (shared components)."""
        with torch.no_grad():
            log_w = torch.log_softmax(torch.as_tensor(logits).detach().to("cpu", torch.float64), dim=-1)
            return log_w, self.mu_float64()[None], \
                self.log_kappa.detach().to("cpu", torch.float64)[None]

    def log_density_rows(self, logits: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        """Each row's log MvMF (nats/sr) at its own points: ``logits [B, c], xyz [B, n, 3] -> [B, n]`` float64, CPU.

        What the Monte Carlo HPD levels evaluate (n = 2,501 points per image). Where the
        components are sharp enough for ``geo.heads.mixture_points``' neighbour lists, each point
        sums only the components near its nearest mean, with a proof that the rest add less than
        float64 resolves: the sum over all c, at a few terms a point. Otherwise (widely
        overlapping components), per row only the components holding all but ``NEGLECT_WEIGHT``
        of its mixing weight take part (the lightest ones, summing to at most 1e-9, are dropped,
        as in the credible radii), the float64 factored product of ``_log_vmf_operands``.
        """
        log_w, mu, log_kappa = self.mixture_parts(logits)
        lhs_all = torch.as_tensor(xyz).detach().to("cpu", torch.float64)
        lists = self._neighbour_lists()
        if lists is not None:
            return torch.from_numpy(log_density_points(lists, log_w.numpy(), lhs_all.numpy()))
        _, rhs_all = _log_vmf_operands(lhs_all[:1, 0], mu[0], log_kappa[0])               # [c, 4]
        out = torch.empty(lhs_all.shape[:2], dtype=torch.float64)
        for r in range(log_w.shape[0]):
            w_sorted, order = torch.sort(log_w[r], descending=True)
            cum = torch.cumsum(torch.exp(w_sorted), 0)
            keep = order[: int(torch.searchsorted(cum, torch.tensor([1.0 - NEGLECT_WEIGHT], dtype=torch.float64))) + 1]
            y = lhs_all[r]
            lhs = torch.cat([y / torch.linalg.vector_norm(y, dim=-1, keepdim=True), torch.ones_like(y[:, :1])], 1)
            rhs = rhs_all[keep]                            # a copy (advanced indexing)
            rhs[:, 3] += log_w[r, keep]                    # the weights folded into the constant column
            out[r] = logsumexp(lhs @ rhs.T, dim=-1)
        return out

    def initial_means_xyz(self, partition):
        """The means before training (``mu_init``: the cells' centres or training-point means), ``[c, 3]``."""
        return partition.centres_xyz if self.options["mu_init"] == "centre" else partition.means_xyz

    # ---- parameters in the dtype the vMF terms use ---------------------------

    @property
    def compute_dtype(self) -> torch.dtype:
        """float32 for a float32 head, float64 for a float64 head; never half precision."""
        return torch.promote_types(self.mu_raw.dtype, torch.float32)

    def mu(self) -> torch.Tensor:
        """Unit means ``[c, 3]`` (differentiable in ``mu_raw``)."""
        return normalize(self.mu_raw.to(self.compute_dtype))

    def _exact(self, device: torch.device) -> bool:
        """Whether the float64 factored form is available (not on MPS, which has no float64)."""
        return device.type != "mps"

    def _operands(self, logits: torch.Tensor, xyz: torch.Tensor):
        """(logits in compute dtype, then the vMF operands: (lhs, rhs) in float64, or (y, mu, log_kappa))."""
        device = self.mu_raw.device
        logits = logits.to(device=device, dtype=self.compute_dtype)
        if self._exact(device):
            f64 = torch.float64
            y = normalize(torch.as_tensor(xyz).to(device=device, dtype=f64))
            return logits, _log_vmf_operands(y, normalize(self.mu_raw.to(f64)), self.log_kappa.to(f64))
        y = torch.as_tensor(xyz).to(device=device, dtype=self.compute_dtype)
        return logits, (y, self.mu(), self.log_kappa.to(self.compute_dtype))

    def _chunk_rows(self, n_other: int) -> int:
        # ~6 temporaries of n_other elements per row (the float64 product, its float32 copy, the sums...).
        per_row = 6 * n_other * 8
        return max(1, self.max_chunk_bytes // max(per_row, 1))

    # ---- the contract ---------------------------------------------------------

    def log_density_at(self, logits: torch.Tensor, target_xyz: torch.Tensor) -> torch.Tensor:
        """log MvMF(y_b | x_b) per steradian for each row's own point: ``[B, c], [B, 3] -> [B]``."""
        device = self.mu_raw.device
        logits = logits.to(device=device, dtype=self.compute_dtype)
        if self._exact(device):
            # One autograd Function over row chunks (geo.heads.mvmf_loss): reused buffers, two saved softmaxes.
            # Its buffers: one float64 and two float32 (or float64) elements per row and cell.
            rows = max(1, self.max_chunk_bytes // (16 * self.n_cells))
            return mvmf_log_density_at(logits, torch.as_tensor(target_xyz).to(device), self.mu_raw, self.log_kappa,
                                       rows)
        y = torch.as_tensor(target_xyz).to(device=device, dtype=self.compute_dtype)
        mu, log_kappa = self.mu(), self.log_kappa.to(self.compute_dtype)
        rows = self._chunk_rows(self.n_cells)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (logits, mu, log_kappa))
        # Checkpointing frees each chunk's [rows, c] temporaries after forward and
        # recomputes them in backward: memory stays O(rows * c) beyond the logits themselves.
        parts = []
        for start in range(0, logits.shape[0], rows):
            args = (logits[start:start + rows], y[start:start + rows], mu, log_kappa)
            parts.append(checkpoint(_mixture_row_log_density_diff, *args, use_reentrant=False) if grad
                         else _mixture_row_log_density_diff(*args))
        return torch.cat(parts) if parts else logits.new_zeros(0)

    def loss(self, logits: torch.Tensor, target_xyz: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood in nats per steradian (paper eq. 4-5): ``[B, c], [B, 3] -> []``."""
        return -self.log_density_at(logits, target_xyz).mean()

    def log_density(self, logits: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        """log MvMF(g | x_b) per steradian on a grid: ``logits [B, c], xyz [G, 3] -> [B, G]``."""
        logits, (a, b, *rest) = self._operands(logits, xyz)
        log_weights = torch.log_softmax(logits, dim=-1)
        n_rows, n_grid = log_weights.shape[0], a.shape[0]
        # The [B, G, c] logsumexp input is the big temporary: chunk G (and B if one row is too big).
        grid_rows = self._chunk_rows(self.n_cells * max(n_rows, 1) // 6 + 1)
        batch_rows = n_rows if grid_rows > 1 else self._chunk_rows(self.n_cells // 6 + 1)
        out = []
        for g0 in range(0, n_grid, grid_rows):
            if rest:
                log_vmf = vmf_log_density_pairwise(a[g0:g0 + grid_rows], b, *rest)        # [g, c]
            else:
                log_vmf = (a[g0:g0 + grid_rows] @ b.T).to(log_weights.dtype)              # [g, c]
            cols = [logsumexp(log_weights[b0:b0 + batch_rows, None, :] + log_vmf[None], dim=-1)
                    for b0 in range(0, n_rows, batch_rows)]
            out.append(torch.cat(cols, dim=0))
        return torch.cat(out, dim=1) if out else log_weights.new_zeros((n_rows, 0))

    def predict(self, logits: torch.Tensor, k: int = 1, mode: str = "argmax", *, n_starts: int = 8,
                n_components: int | None = None, max_iter: int = 10_000) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted locations ``(lat_deg [B, k], lon_deg [B, k])``, float64 degrees.

        mode="argmax" (eq. 7, the paper's): the means of the k components with the
        largest mixing weights (k distinct components, best first).
        mode="mode" (eq. 6): local maxima of the density, best first, found by the
        fixed-point iteration y <- normalize(sum_i r_i(y) kappa_i mu_i) (r = posterior
        responsibilities, computed in log space) from the ``max(n_starts, 2k)``
        component means where the mixture density is highest (so clusters of light
        overlapping components are searched, not only the heaviest isolated ones),
        which is an MM ascent, so each start climbs monotonically to a local maximum;
        it runs until converged (a RuntimeWarning names rows still moving after
        ``max_iter`` iterations). The search runs on each row's kept components
        (``geo.heads.mixture_reach``): every component near any place whose neighbours'
        summed peaks could beat the densest mean, so the components left out cannot
        raise the maximum by more than ``MODE_GAP_NATS`` (their tail, ~1e-9 nats).
        ``n_components`` caps the kept components per row (None: no cap); a row whose
        cut could hide a higher maximum gets a RuntimeWarning with the possible gap.
        Distinct maxima (further apart than ~1 m) come first; fewer than k distinct
        maxima are padded with repeats.
        """
        k = self._check_k(k)
        if mode == "argmax":
            index = torch.topk(logits.detach(), k, dim=-1).indices.cpu()
            return xyz_to_latlon(normalize(self.mu_raw.detach().cpu().to(torch.float64))[index])
        if mode != "mode":
            raise ConfigError(f"predict mode for the mvmf head must be one of {', '.join(self.predict_modes)}, "
                              f"not {mode!r}")
        with torch.no_grad():
            points = _density_modes(self, logits, k, max(n_starts, 2 * k), n_components, max_iter)
        return xyz_to_latlon(points.cpu())

    def _per_components(self, name: str, build):
        """``build(mu [c, 3], log_kappa [c])`` (float64 numpy), kept under ``name`` until mu or kappa
        change (what it builds depends on them only, not on the row)."""
        key = (self.mu_raw._version, self.log_kappa._version, self.mu_raw.data_ptr(), self.log_kappa.data_ptr())
        cached = self.__dict__.get(name)
        if cached is None or cached[0] != key:
            cached = (key, build(self.mu_float64().numpy(), self.log_kappa.detach().cpu().double().numpy()))
            self.__dict__[name] = cached
        return cached[1]

    def _reach_graph(self) -> ReachGraph | None:
        """The components' pair graph of the mode search (``geo.heads.mixture_reach``, on the CPU)."""
        # an int32 index twice and a float64 value per pair
        return self._per_components("_reach_cache", lambda mu, lk: reach_graph(mu, lk, self.max_chunk_bytes // 16))

    def _neighbour_lists(self) -> NeighbourLists | None:
        """The neighbour lists of ``log_density_rows`` (``geo.heads.mixture_points``, on the CPU)."""
        # an int32 index per pair, and the temporaries of PAIRS_PER_CHUNK terms at a time
        return self._per_components("_neighbour_cache",
                                    lambda mu, lk: neighbour_lists(mu, lk, self.max_chunk_bytes // 4))


# A row whose cut support (``n_components``) could hide a maximum this much higher is warned about.
MODE_GAP_NATS = 1e-6


def _density_modes(head: MvMFHead, logits: torch.Tensor, k: int, n_starts: int, max_components: int | None,
                   max_iter: int) -> torch.Tensor:
    """k highest local maxima of each row's MvMF density, ``[B, k, 3]`` float64 unit vectors.

    Each row's kept components come from ``geo.heads.mixture_reach.mode_support``; the search
    itself is ``geo.heads.mixture_modes.mixture_modes``, started from the densest kept means.
    """
    f64 = torch.float64
    # float64 throughout (on the CPU for devices without it): the iteration resolves metres.
    device = head.mu_raw.device if head._exact(head.mu_raw.device) else torch.device("cpu")
    mu_all = normalize(head.mu_raw.detach().to(device=device, dtype=f64))
    log_kappa_all = head.log_kappa.detach().to(device=device, dtype=f64)
    graph = head._reach_graph()
    n_rows = logits.shape[0]
    log_weights = torch.log_softmax(logits.detach().to(dtype=f64), dim=-1).cpu()
    peak = (log_weights + vmf_log_normalizer(log_kappa_all.cpu())[None, :]).numpy()
    supports = [mode_support(peak[r], graph, k, max_components) for r in range(n_rows)]
    gap = np.array([s.gap_nats for s in supports])
    counts = [len(s.index) for s in supports]
    out = torch.zeros((n_rows, k, 3), dtype=f64, device=device)
    # The climb's temporaries are ~4 float64 [rows, starts, L, 3]: rows of similar L together, chunked.
    climb_bytes = 4 * 8 * 3 * n_starts
    order = np.argsort(counts, kind="stable")
    i = 0
    while i < n_rows:
        j = min(n_rows, i + max(1, head.max_chunk_bytes // (climb_bytes * counts[order[i]])))
        j = min(j, i + max(1, head.max_chunk_bytes // (climb_bytes * counts[order[j - 1]])))
        rows = order[i:j]
        width = counts[order[j - 1]]
        index = np.zeros((len(rows), width), dtype=np.int64)
        valid = np.zeros((len(rows), width), dtype=bool)
        for n, r in enumerate(rows):
            index[n, :counts[r]], valid[n, :counts[r]] = supports[r].index, True
        index_t, valid_t = torch.from_numpy(index).to(device), torch.from_numpy(valid).to(device)
        sel = torch.from_numpy(rows).to(device)
        lw = torch.where(valid_t, torch.gather(log_weights.to(device)[sel], 1, index_t), -math.inf)
        # the densest kept means first (the support's order); short rows repeat their best
        starts = torch.arange(min(n_starts, width), device=device).expand(len(rows), -1)
        starts = torch.where(valid_t[:, :starts.shape[1]], starts, torch.zeros_like(starts))
        out[sel] = mixture_modes(lw, mu_all[index_t], log_kappa_all[index_t], k, n_starts, max_iter,
                                 start_index=starts)
        i = j
    bad = np.flatnonzero(gap > MODE_GAP_NATS)
    if len(bad):
        named = ", ".join(str(r) for r in bad[:10]) + (", ..." if len(bad) > 10 else "")
        warnings.warn(f"vMF mixture mode search: {len(bad)} of {n_rows} rows (rows {named}) could not bound the "
                      f"components left out (n_components = {max_components}): the maximum may be up to "
                      f"{float(gap.max()):.3g} nats higher than found (raise n_components, or pass None)",
                      RuntimeWarning, stacklevel=3)
    return out
