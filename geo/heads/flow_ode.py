"""Flows on the unit sphere S²: the exact divergence of a tangent field, log-densities and samples by ODE.

A time-dependent tangent field ``v(t, x)`` on S² moves the uniform density
``p_0 = 1 / 4π`` per steradian at t = 0 to ``p_1`` at t = 1 (probability-flow ODE
``dx/dt = v(t, x)``). Along a trajectory, ``d/dt log p_t(x_t) = -div_S v(t, x_t)``, so

    log p_1(x_1) = -log 4π - ∫_0^1 div_S v(t, x_t) dt.

**The divergence on the sphere.** ``field(t, x)`` is evaluated for points ``x``
of R³ (its ambient extension; e.g. ``v(x) = P_x f(x)`` with ``P_x = I - x xᵀ``)
and is tangent at unit x. With ``J`` the 3×3 Jacobian of the ambient field at a
unit x, the surface divergence is ``div_S v = tr(P_x J P_x) = tr(J P_x) = tr(J) - xᵀ J x``:
only derivatives along the tangent plane count, so any extension gives the same
value (P_x is idempotent and the trace cyclic). Checks: a rotation ``ω × x`` has
J = [ω]×, divergence 0; the gradient field ``P_x a`` has divergence ``-2 a·x``
(the l = 1 eigenvalue of the Laplacian). ``J`` is computed exactly, row by
row, with one forward and three backward passes: no Hutchinson estimate.

**Integration.** ``torchdiffeq.odeint`` with the adaptive Dormand-Prince 5(4)
method (``dopri5``); each step's local error estimate must satisfy
``|err| <= atol + rtol |y|`` in the max norm over all rows (not the RMS norm,
so no row of a batch is integrated more loosely than the tolerance states).
The field is always evaluated at ``x / |x|``: the solver's O(tol) drift off the
sphere is never fed to the field, and the end point is renormalised.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from geo.errors import ConfigError

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``field(t, x) -> v``: t a 0-d tensor (shared by every row), x ``[N, 3]`` -> ``[N, 3]`` (tangent at unit x)."""

LOG_UNIFORM = -math.log(4.0 * math.pi)  # log density of the uniform base, nats per steradian
DEFAULT_RTOL = 1e-5
DEFAULT_ATOL = 1e-5


def _odeint():
    try:
        from torchdiffeq import odeint
    except ImportError as err:  # an optional extra: say how to get it
        raise ConfigError("the flow head needs torchdiffeq: pip install 'geo-mvmf[flow]' (or torchdiffeq)") from err
    return odeint


def _max_norm(state) -> torch.Tensor:
    """The max norm over every element of the state (a tuple of tensors or one tensor)."""
    tensors = state if isinstance(state, (tuple, list)) else (state,)
    return torch.stack([t.abs().max() for t in tensors]).max()


def sphere_divergence(field_x: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The field and its exact surface divergence at unit points: ``x [N, 3] -> (v [N, 3], div [N])``.

    ``field_x`` maps ``[N, 3] -> [N, 3]`` row by row (row i of the output depends on row i of
    the input only), so the gradient of the batch sum of output component i is row i of
    every point's 3×3 Jacobian ``J``: one forward pass and three backward passes (reverse mode
    measured ~3.5x faster than ``torch.func.jvp`` on a CPU for the flow head's network). Then
    ``div = tr(J) - xᵀ J x`` (module docstring). Values only: no graph is kept for a further backward.
    """
    with torch.enable_grad():
        z = x.detach().requires_grad_(True)
        v = field_x(z)
        rows = [torch.autograd.grad(v[:, i].sum(), z, retain_graph=i < 2)[0] for i in range(3)]
    jac = torch.stack(rows, dim=1)                                  # [N, 3 (output), 3 (input)]
    trace = jac.diagonal(dim1=-2, dim2=-1).sum(-1)
    return v.detach(), trace - torch.einsum("ni,nij,nj->n", x, jac, x)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _solve(dynamics, state, t_from: float, t_to: float, rtol: float, atol: float):
    odeint = _odeint()
    times = torch.tensor([t_from, t_to], dtype=state[0].dtype, device=state[0].device)
    out = odeint(dynamics, state, times, rtol=rtol, atol=atol, method="dopri5", options={"norm": _max_norm})
    return tuple(s[-1] for s in out)


def flow_log_density(field: Field, x1: torch.Tensor, *, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL
                     ) -> torch.Tensor:
    """log p_1(x1) per steradian: integrate from x1 at t = 1 back to t = 0 with the divergence.

    ``x1 [N, 3]`` unit points -> ``[N]`` nats per steradian. ``field`` must not need gradients
    (runs in forward-mode AD only).
    """
    x1 = _unit(x1)

    def dynamics(t, state):
        x = _unit(state[0])
        v, div = sphere_divergence(lambda y: field(t, y), x)
        return v, div

    _, integral = _solve(dynamics, (x1, torch.zeros_like(x1[:, 0])), 1.0, 0.0, rtol, atol)
    # integral = ∫_1^0 div dt = -∫_0^1 div dt
    return LOG_UNIFORM + integral


def flow_samples(field: Field, x0: torch.Tensor, *, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL,
                 with_log_density: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Push base points ``x0 [N, 3]`` (uniform on S²) from t = 0 to t = 1: ``(x1 [N, 3], log p_1(x1) [N] or None)``.

    With ``with_log_density`` the divergence is integrated along the way (three JVPs per
    evaluation), giving each sample's log density (nats per steradian) at no extra solve.
    """
    x0 = _unit(x0)
    if with_log_density:
        def dynamics(t, state):
            return sphere_divergence(lambda y: field(t, y), _unit(state[0]))

        x1, integral = _solve(dynamics, (x0, torch.zeros_like(x0[:, 0])), 0.0, 1.0, rtol, atol)
        return _unit(x1), LOG_UNIFORM - integral

    def plain(t, state):
        return (field(t, _unit(state[0])),)

    (x1,) = _solve(plain, (x0,), 0.0, 1.0, rtol, atol)
    return _unit(x1), None


def uniform_sphere(n: int, *, generator: torch.Generator | None = None, dtype=torch.float32,
                   device=None) -> torch.Tensor:
    """``n`` points uniform on S² ``[n, 3]`` (normalised Gaussians)."""
    g = torch.randn(n, 3, generator=generator, dtype=dtype, device=device)
    return _unit(g)
