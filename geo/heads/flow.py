"""The ``flow`` head: Riemannian flow matching on S² conditioned on the features (PLONK's generative head).

A conditional tangent field ``v_θ(x, t | features)`` on the unit sphere carries the uniform
density at t = 0 to the head's density ``p(y | features)`` at t = 1.

**Network.** ``forward(features [B, d])`` computes once per row the adaptive-layer-norm
modulations ``[B, M]`` (``M = (3 depth + 2) width``: shift, scale and gate of every
residual block, shift and scale of the output layer) from ``SiLU(W x + b)``; at every
time t a linear map of a sinusoidal time embedding is added to them (affine in t's
embedding, so an ODE solve, where every row shares t, pays it once per step, not per row).
The residual MLP takes ``x`` (3 numbers, lifted to ``width``) through ``depth`` AdaLN
blocks to ``f(x) ∈ R³``; the field is its tangent part ``v = P_x f = f - (x·f) x``
(also the ambient extension whose exact divergence ``geo.heads.flow_ode`` integrates).

**Training** (Riemannian flow matching, Chen & Lipman 2024): ``x_0`` uniform on S², ``t``
drawn as ``1 - u^p`` (u uniform, p = ``time_power``; 1 = uniform t, 2 puts more draws near
t = 1, where a city-sharp density is made: −0.16 nat of the oracle gap in the CPU budget),
``pairs`` draws of (x_0, t) per row (the row's modulations computed once), ``x_t`` on the
great circle from ``x_0`` to the true point ``x_1`` (``x_t = exp_{x_0}(t log_{x_0} x_1)``),
target ``u_t = d x_t / dt`` (constant speed: the angle from x_0 to x_1); the loss is
``mean |v_θ(x_t, t) - u_t|²`` (rad² per unit time², not nats: the NLL this head reports
comes from the ODE, below). With ``cond_dropout`` a fraction
of the training rows get a learned null condition instead of their features, so that
sampling can use classifier-free guidance: ``v = v_null + w (v_cond - v_null)`` (``guidance`` w; 1 = none).

**Density** (``log_density_at``, ``log_density``): the exact log-density per steradian,
by integrating the probability-flow ODE from the point at t = 1 back to the uniform base
with the exact surface divergence (``flow_ode.flow_log_density``: dopri5, ``rtol``, ``atol``;
each step's error ``<= atol + rtol |y|`` in the max norm). It is the density of the guided
field when ``guidance != 1``. Slow: every row is an ODE solve with a 3×3 Jacobian per
evaluation (three JVPs); ``log_density`` on a grid solves ``B × G`` points, in chunks of
``ODE_CHUNK_POINTS``.

**Sampling and prediction.** ``sample(output, n)`` pushes uniform points forward with the same
solver (the end points renormalised onto the sphere). ``predict`` mode "best" is PLONK's
best of N by density: ``n_samples`` samples per row with their log-densities (integrated along
the way), the k highest-density ones that are at least ``distinct_km`` apart (``topk`` gives
their share of the samples' summed density as the score, and their sample index). "mode"
refines each of those by a pattern search on the exact log-density (6 points on a ring,
the ring halved when none is higher). Predictions use a private generator seeded with
``seed``: ``predict`` and ``topk`` of one output agree, and evaluations repeat exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from geo.errors import ConfigError
from geo.geometry import normalize, xyz_to_latlon
from geo.heads import density
from geo.heads.base import Head
from geo.heads.flow_ode import DEFAULT_ATOL, DEFAULT_RTOL, flow_log_density, flow_samples, uniform_sphere
from geo.heads.low_precision import matmul_dtype_of, matmul_dtype_option, resolve_matmul_dtype
from geo.heads.registry import register_head

# Monte Carlo samples per row of the calibration (each is an ODE solve with its divergence).
CALIBRATION_SAMPLES = 256

EARTH_RADIUS_KM = 6371.0088
TIME_FREQUENCIES = 6  # sinusoidal time embedding: sines and cosines of pi 2^k t, k = -1..4 (smooth in t:
# an adaptive solver pays for every fast oscillation of the field in t)
ODE_CHUNK_POINTS = 4096  # points per ODE solve (the adaptive step follows the hardest point of a solve)
MODE_ITERATIONS = 8  # pattern-search steps of the "mode" prediction
MODE_RADIUS0_RAD = 0.02  # its first ring (~130 km)


def geodesic_path(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_t = exp_{x0}(t log_{x0} x1)`` and its time derivative ``u_t``: ``[N, 3], [N, 3], [N] -> [N, 3], [N, 3]``.

    With θ the angle from x0 to x1 and w = log_{x0} x1 (tangent at x0, |w| = θ):
    ``x_t = cos(tθ) x0 + sin(tθ) w/θ`` and ``u_t = -θ sin(tθ) x0 + cos(tθ) w`` (|u_t| = θ).
    θ from atan2(|x0 × x1|, x0·x1) (accurate at every angle); θ -> 0 gives x_t = x0, u_t = 0.
    """
    dot = (x0 * x1).sum(-1, keepdim=True)
    theta = torch.atan2(torch.linalg.cross(x0, x1, dim=-1).norm(dim=-1, keepdim=True), dot)
    perp = x1 - dot * x0                                      # |perp| = sin θ
    direction = perp / perp.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # unit tangent at x0 towards x1
    tt = t[:, None] * theta
    x_t = torch.cos(tt) * x0 + torch.sin(tt) * direction
    u_t = theta * (-torch.sin(tt) * x0 + torch.cos(tt) * direction)
    return x_t, u_t


class _Block(nn.Module):
    """A residual MLP block with adaptive layer norm: ``h + gate * MLP(LN(h) (1 + scale) + shift)``."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h, shift, scale, gate):
        return h + gate * self.fc2(F.silu(self.fc1(self.norm(h) * (1 + scale) + shift)))


@register_head("flow")
class FlowHead(Head):
    """Riemannian flow matching on S² conditioned on the features (module docstring).

    Args:
        feature_dim: d, the width of the features.
        width, depth: the residual AdaLN-MLP of the field (defaults train on a CPU).
        cond_dropout: fraction of training rows given the null condition (classifier-free guidance).
        guidance: w of ``v_null + w (v_cond - v_null)`` at sampling and density; 1 = no guidance.
        n_samples: N of "best of N" (also ``max_k``).
        distinct_km: the least distance between the k points of ``predict``/``topk``.
        rtol, atol: the ODE solver's tolerances (dopri5, max norm).
        seed: of the private generator of ``predict`` / ``topk``.
        matmul_dtype: None or bfloat16, for the W x product only.
        pairs: training pairs (x_0, t) per row and step.
        time_power: p of the training times ``t = 1 - u^p``.
    """

    has_density = True
    predict_modes = ("best", "mode")
    val_rows_cap = 2000  # every val row is 1 + n_samples ODE solves: select on a fixed 2,000 of them

    def __init__(self, feature_dim: int, *, width: int = 128, depth: int = 3, cond_dropout: float = 0.1,
                 guidance: float = 1.0, n_samples: int = 16, distinct_km: float = 100.0,
                 rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL, seed: int = 0, matmul_dtype: Any = None,
                 pairs: int = 2, time_power: float = 2.0):
        super().__init__(feature_dim)
        for name, value, low in (("width", width, 1), ("depth", depth, 1), ("n_samples", n_samples, 1),
                                 ("pairs", pairs, 1)):
            if int(value) < low:
                raise ConfigError(f"flow head: {name} must be >= {low}, not {value}")
        if not (math.isfinite(float(time_power)) and float(time_power) > 0):
            raise ConfigError(f"flow head: time_power must be > 0, not {time_power}")
        self.pairs, self.time_power = int(pairs), float(time_power)
        if not 0.0 <= float(cond_dropout) < 1.0:
            raise ConfigError(f"flow head: cond_dropout must be in [0, 1), not {cond_dropout}")
        if not (float(rtol) > 0 and float(atol) > 0):
            raise ConfigError(f"flow head: rtol and atol must be > 0, not {rtol}, {atol}")
        if not math.isfinite(float(guidance)) or not float(distinct_km) >= 0:
            raise ConfigError(f"flow head: guidance must be finite and distinct_km >= 0 ({guidance}, {distinct_km})")
        self.width, self.depth = int(width), int(depth)
        self.cond_dropout, self.guidance = float(cond_dropout), float(guidance)
        self.n_samples, self.distinct_km = int(n_samples), float(distinct_km)
        self.rtol, self.atol, self.seed = float(rtol), float(atol), int(seed)
        self.matmul_dtype = resolve_matmul_dtype(matmul_dtype)
        w = self.width
        self.n_mod = (3 * self.depth + 2) * w
        self.linear = nn.Linear(self.feature_dim, w)           # the condition from the features
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.null_condition = nn.Parameter(torch.zeros(w))   # the condition of a dropped row
        self.cond_mod = nn.Linear(w, self.n_mod)
        self.time_mod = nn.Linear(2 * TIME_FREQUENCIES, self.n_mod)
        self.lift = nn.Linear(3, w)
        self.blocks = nn.ModuleList(_Block(w) for _ in range(self.depth))
        self.out_norm = nn.LayerNorm(w, elementwise_affine=False)
        self.out = nn.Linear(w, 3)
        with torch.no_grad():
            self.out.weight.mul_(0.1)  # a field near 0 at first: the head starts near the uniform density
            self.out.bias.zero_()
        self.register_buffer("frequencies", torch.pi * 2.0 ** torch.arange(-1, TIME_FREQUENCIES - 1, dtype=torch.float32))
        self.options = {"width": self.width, "depth": self.depth, "cond_dropout": self.cond_dropout,
                        "pairs": self.pairs, "time_power": self.time_power,
                        "guidance": self.guidance, "n_samples": self.n_samples, "distinct_km": self.distinct_km,
                        "rtol": self.rtol, "atol": self.atol, "seed": self.seed,
                        "matmul_dtype": matmul_dtype_option(self.matmul_dtype)}
        self._cache: tuple | None = None  # (output, (points, log_density)) of the last best-of-N

    @classmethod
    def options_from_config(cls, config: dict) -> dict:
        # flow_pairs and flow_time_power came later: a run without them trained with 1 and 1.
        return dict(width=int(config.get("flow_width") or 128), depth=int(config.get("flow_depth") or 3),
                    pairs=int(config.get("flow_pairs") or 1), time_power=float(config.get("flow_time_power") or 1.0),
                    cond_dropout=float(config.get("flow_cond_dropout", 0.1)),
                    guidance=float(config.get("flow_guidance", 1.0)),
                    n_samples=int(config.get("flow_samples") or 16), matmul_dtype=matmul_dtype_of(config))

    @classmethod
    def parameter_count(cls, feature_dim: int, n_cells: int) -> int:
        w, depth = 128, 3  # the defaults (an estimate for the sweep's memory plan)
        n_mod = (3 * depth + 2) * w
        return (feature_dim + 1) * w + w + (w + 1) * n_mod + (2 * TIME_FREQUENCIES + 1) * n_mod + 4 * w \
            + depth * 2 * (w + 1) * w + (w + 1) * 3

    @property
    def max_k(self) -> int:
        return self.n_samples

    def weight_decay_parameters(self) -> list[nn.Parameter]:
        return [self.linear.weight] if self.linear.weight.requires_grad else []

    # ---- the field ------------------------------------------------------------------------

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """The rows' modulations ``[B, M]`` (float32) from features ``[B, d]``; training drops conditions."""
        cond = F.silu(self.linear_product(features))
        if self.training and self.cond_dropout > 0:
            dropped = torch.rand(cond.shape[0], device=cond.device) < self.cond_dropout
            cond = torch.where(dropped[:, None], self.null_condition.to(cond.dtype), cond)
        return self.cond_mod(cond)

    def _null_modulation(self, like: torch.Tensor) -> torch.Tensor:
        return self.cond_mod(F.silu(self.null_condition.to(like.dtype)))[None, :]

    def _time_modulation(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        angle = t.to(like.dtype).reshape(-1, 1) * self.frequencies.to(like.dtype)
        return self.time_mod(torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1))  # [1 or N, M]

    def field(self, x: torch.Tensor, t: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        """``v(x, t)`` ``[N, 3]``, tangent at unit x, for points ``x [N, 3]``, t (0-d or ``[N]``), rows' ``modulation [N, M]``."""
        mod = modulation + self._time_modulation(t, modulation)
        w = self.width
        h = self.lift(x.to(mod.dtype))
        for i, block in enumerate(self.blocks):
            shift, scale, gate = mod[:, 3 * i * w:3 * (i + 1) * w].split(w, dim=-1)
            h = block(h, shift, scale, gate)
        shift, scale = mod[:, 3 * self.depth * w:].split(w, dim=-1)
        f = self.out(self.out_norm(h) * (1 + scale) + shift)
        return f - (x * f).sum(-1, keepdim=True) * x

    def _guided(self, modulation: torch.Tensor):
        """``field(t, x)`` over rows with ``modulation [N, M]``, with classifier-free guidance when w != 1."""
        if self.guidance == 1.0:
            return lambda t, x: self.field(x, t, modulation)
        null = self._null_modulation(modulation).expand_as(modulation)
        w = self.guidance

        def guided(t, x):
            v_null = self.field(x, t, null)
            return v_null + w * (self.field(x, t, modulation) - v_null)
        return guided

    # ---- training ---------------------------------------------------------------------------

    def loss(self, output: torch.Tensor, target_xyz: torch.Tensor) -> torch.Tensor:
        """The flow-matching loss ``mean |v(x_t, t) - u_t|²`` (rad²): ``output [B, M], target_xyz [B, 3] -> []``."""
        x1 = torch.as_tensor(target_xyz).to(output)
        if self.pairs > 1:  # several (x0, t) per row: the row's modulations are computed once for all of them
            x1, output = x1.repeat(self.pairs, 1), output.repeat(self.pairs, 1)
        x0 = uniform_sphere(x1.shape[0], dtype=output.dtype, device=output.device)
        t = 1 - torch.rand(x1.shape[0], dtype=output.dtype, device=output.device) ** self.time_power
        x_t, u_t = geodesic_path(x0, x1, t)
        return (self.field(x_t, t, output) - u_t).pow(2).sum(-1).mean()

    # ---- density ------------------------------------------------------------------------------

    def _log_density_pairs(self, modulation: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, xyz.shape[0], ODE_CHUNK_POINTS):
            sl = slice(start, start + ODE_CHUNK_POINTS)
            out.append(flow_log_density(self._guided(modulation[sl]), xyz[sl], rtol=self.rtol, atol=self.atol))
        return torch.cat(out) if out else xyz.new_zeros((0,))

    def log_density_at(self, output: torch.Tensor, target_xyz: torch.Tensor) -> torch.Tensor:
        """log p(y_b | x_b) per steradian by the ODE: ``output [B, M], target_xyz [B, 3] -> [B]`` (slow)."""
        with torch.no_grad():
            return self._log_density_pairs(output, torch.as_tensor(target_xyz).to(output))

    def log_density(self, output: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        """log p(g | x_b) per steradian on points ``xyz [G, 3]``: ``-> [B, G]`` (B × G ODE solves; slow)."""
        grid = normalize(torch.as_tensor(xyz).to(output))
        b, g = output.shape[0], grid.shape[0]
        rows = max(1, ODE_CHUNK_POINTS // max(1, g))
        out = []
        with torch.no_grad():
            for start in range(0, b, rows):
                mod = output[start:start + rows]
                pairs_mod = mod[:, None, :].expand(-1, g, -1).reshape(-1, mod.shape[1])
                pairs_xyz = grid[None].expand(mod.shape[0], -1, -1).reshape(-1, 3)
                out.append(self._log_density_pairs(pairs_mod, pairs_xyz).view(mod.shape[0], g))
        return torch.cat(out) if out else output.new_zeros((0, g))

    # ---- sampling and prediction ------------------------------------------------------------

    def _push(self, output: torch.Tensor, x0: torch.Tensor, with_log_density: bool):
        """``x0 [B, n, 3]`` pushed to t = 1 under each row's field: ``[B, n, 3]`` (and log p ``[B, n]``)."""
        b, n = x0.shape[:2]
        mod = output[:, None, :].expand(-1, n, -1).reshape(b * n, -1)
        flat = x0.reshape(b * n, 3)
        points, logs = [], []
        with torch.no_grad():
            for start in range(0, b * n, ODE_CHUNK_POINTS):
                sl = slice(start, start + ODE_CHUNK_POINTS)
                x1, log_p = flow_samples(self._guided(mod[sl]), flat[sl], rtol=self.rtol, atol=self.atol,
                                         with_log_density=with_log_density)
                points.append(x1)
                logs.append(log_p)
        points = torch.cat(points).view(b, n, 3) if points else x0.clone()
        if not with_log_density:
            return points, None
        return points, (torch.cat(logs).view(b, n) if logs else x0.new_zeros((b, n)))

    def sample(self, output: torch.Tensor, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws per row from the head's density: ``output [B, M] -> xyz [B, n, 3]`` float64 on the CPU
        (reproducible with a seeded CPU ``generator``; torch's global RNG without one)."""
        b = output.shape[0]
        if b == 0 or int(n) == 0:
            return torch.zeros((b, int(n), 3), dtype=torch.float64)
        x0 = uniform_sphere(b * int(n), generator=generator, dtype=torch.float64).to(output).view(b, int(n), 3)
        with torch.no_grad():
            points = self._push(output.detach(), x0, with_log_density=False)[0]
        return normalize(points.to("cpu", torch.float64))  # unit to float64 rounding, whatever the head's dtype

    def calibration(self, output: torch.Tensor, target_xyz: torch.Tensor, *, levels=density.CREDIBLE_LEVELS,
                    n_samples: int = density.DEFAULT_SAMPLES, generator: torch.Generator | None = None,
                    method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """HPD levels ``[B]`` and credible areas ``[B, L]`` (sr), always by Monte Carlo (no closed form).

        Each sample's log-density comes with it from the same ODE solve (``_push``), and the
        truth's from ``log_density_at``. An ODE solve per sample is costly, so at most
        ``CALIBRATION_SAMPLES`` samples per row are drawn: the HPD level's standard error is then
        at most 0.5 / sqrt(256) = 0.031 (not the 0.01 of the other heads' 2,500 samples).
        """
        if method not in ("auto", "monte-carlo"):
            raise ValueError(f"method must be 'auto' or 'monte-carlo', not {method!r}")
        n = min(int(n_samples), CALIBRATION_SAMPLES)
        b = output.shape[0]
        with torch.no_grad():
            x0 = uniform_sphere(b * n, generator=generator, dtype=torch.float64).to(output).view(b, n, 3)
            _, log_samples = self._push(output.detach(), x0, with_log_density=True)
            y = torch.as_tensor(target_xyz).detach().to(output)
            log_truth = self.log_density_at(output.detach(), y)
        return density.monte_carlo_hpd(log_truth.double().cpu(), log_samples.double().cpu(), levels, generator)

    def _best_of_n(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``n_samples`` samples per row and their log-densities (private generator; cached for the same output)."""
        if self._cache is not None and self._cache[0] is output:
            return self._cache[1]
        generator = torch.Generator().manual_seed(self.seed)
        b = output.shape[0]
        x0 = uniform_sphere(b * self.n_samples, generator=generator, dtype=torch.float64)
        x0 = x0.to(output).view(b, self.n_samples, 3)
        result = self._push(output.detach(), x0, with_log_density=True)
        self._cache = (output, result)
        return result

    def _distinct(self, points: torch.Tensor, log_p: torch.Tensor, k: int) -> torch.Tensor:
        """Indices ``[B, k]`` of the k highest-density samples at least ``distinct_km`` apart (greedy;
        when fewer are that far apart, the next highest fill the rest)."""
        order = torch.argsort(log_p, dim=1, descending=True)
        min_cos = math.cos(self.distinct_km / EARTH_RADIUS_KM)
        chosen = []
        for row in range(points.shape[0]):
            picks: list[int] = []
            for i in order[row].tolist():
                if all(float(points[row, i] @ points[row, j]) < min_cos for j in picks):
                    picks.append(i)
                    if len(picks) == k:
                        break
            for i in order[row].tolist():
                if len(picks) == k:
                    break
                if i not in picks:
                    picks.append(i)
            chosen.append(picks)
        return torch.tensor(chosen, dtype=torch.int64, device=points.device).view(points.shape[0], k)

    def topk(self, output: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best-of-N points' share of the N samples' summed density ``[B, k]``, and their sample index."""
        k = self._check_k(k)
        points, log_p = self._best_of_n(output)
        index = self._distinct(points, log_p, k)
        share = torch.softmax(log_p.to(torch.float64), dim=1)
        return torch.gather(share, 1, index).to(torch.float32), index

    def _refine(self, output: torch.Tensor, points: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
        """Pattern search on the exact log-density from ``points [B, k, 3]`` (module docstring)."""
        b, k = points.shape[:2]
        mod = output[:, None, :].expand(-1, k, -1).reshape(b * k, -1)
        x = points.reshape(b * k, 3).clone()
        best = log_p.reshape(b * k).clone()
        radius = torch.full((b * k,), MODE_RADIUS0_RAD, dtype=x.dtype, device=x.device)
        helper = torch.tensor([0.3, 0.5, 0.8], dtype=x.dtype, device=x.device).expand_as(x)
        e1 = normalize(torch.linalg.cross(x, helper, dim=-1))
        angles = torch.arange(6, dtype=x.dtype, device=x.device) * (math.pi / 3)
        for _ in range(MODE_ITERATIONS):
            e1 = normalize(e1 - (e1 * x).sum(-1, keepdim=True) * x)
            e2 = torch.linalg.cross(x, e1, dim=-1)
            direction = torch.cos(angles)[None, :, None] * e1[:, None] + torch.sin(angles)[None, :, None] * e2[:, None]
            ring = normalize(torch.cos(radius)[:, None, None] * x[:, None] + torch.sin(radius)[:, None, None] * direction)
            ring_log_p = self._log_density_pairs(mod.repeat_interleave(6, dim=0), ring.reshape(-1, 3)).view(-1, 6)
            top, arg = ring_log_p.max(dim=1)
            better = top > best
            x = torch.where(better[:, None], ring[torch.arange(b * k), arg], x)
            best = torch.where(better, top, best)
            radius = torch.where(better, radius, radius / 2)
        return x.view(b, k, 3)

    def predict(self, output: torch.Tensor, k: int = 1, mode: str = "best") -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted locations ``(lat_deg [B, k], lon_deg [B, k])``, float64 degrees (module docstring)."""
        k = self._check_k(k)
        self._check_mode(mode)
        with torch.no_grad():
            points, log_p = self._best_of_n(output)
            index = self._distinct(points, log_p, k)
            picked = torch.gather(points, 1, index[..., None].expand(-1, -1, 3))
            if mode == "mode" and output.shape[0]:
                picked = self._refine(output.detach(), picked, torch.gather(log_p, 1, index))
        return xyz_to_latlon(normalize(picked.detach().to("cpu", torch.float64)))
