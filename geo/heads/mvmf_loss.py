"""The MvMF log-likelihood per row as one autograd Function, in row chunks with reused buffers.

    log MvMF(y_b | x_b) = logsumexp_i(logits_bi + log vMF(y_b; mu_i, kappa_i)) - logsumexp_i(logits_bi)

``mvmf_log_density_at(logits [B, c], y [B, 3], mu_raw [c, 3], log_kappa [c]) -> [B]``
(nats per steradian). ``mu_raw`` is normalised here, and its gradient goes back
through the normalisation.

Why a Function and not autograd on the expression: autograd keeps (or, with
checkpointing, recomputes) every [B, c] intermediate and allocates a fresh one per
op, and on CPU a fresh 32 MB tensor costs more in page faults than the pass that
fills it. Here each chunk of rows writes into two (three for float32 logits)
buffers reused across chunks, and the row-wise softmax kernel (max, exp, sum and
scale in one sweep of each row while it is in cache) does the exponentials.
Backward recomputes the log vMF matrix instead of storing it (nothing [B, c]-sized
is saved beyond the logits autograd holds anyway). Per chunk of b rows:

- forward: L = [y, 1] @ [kappa mu, log C - kappa].T in float64 (the exact form,
  see below), rounded into the logits' dtype; s = logits + L; the two row
  logsumexps from the softmax of s and of the logits at their row maxima;
- backward (g = d out / d row): r = softmax(s), p = softmax(logits);
  d logits = g (r - p); with G = g r, d mu_i = kappa_i sum_b G_bi y_b and
  d log kappa_i = sum_b G_bi (d log C_i - log C_i + L_bi), as a few vector-matrix
  products, then through the normalisation of mu_raw in float64 on [c, 3].

The log vMF matrix: for unit vectors log vMF = log C(kappa) - kappa + kappa mu.y,
one K = 4 float64 matrix product whose error is ~1e-16 kappa nats (1e-9 at
kappa = e^16; in float32 this form would be the "kappa (mu.y - 1)" pitfall of
PAPER.md, off by ~1 nat). Measured here ([1024, 8192] into a reused buffer): the
float64 K = 4 product takes about as long as a float32 one (13-24 ms each, memory
bound), so an exact float32 alternative (a hi/lo split of y and mu: two float32
products and a scaling pass) would not be faster; the rounding to float32 is one
more pass. Measured error of the float32 loss against a float64 reference at
kappa = e^16: <= 4e-7 nats within 30 km of a mean, <= 5e-8 relative beyond.

Precision of the gradients in float32: d logits and d log kappa to float32
rounding of the terms (d log kappa uses L - log C, ~1e-6 absolute); d mu from
sum_b G_bi y_b accumulated in float32, whose error ~6e-8 sum_b G_bi is relative
to the tangential part of the gradient ~6e-8 / |y - mu| (~2e-4 at one standard
deviation of a kappa = e^16 component): harmless for a stochastic optimiser.
A float64 head (``head.double()``) does everything in float64.
"""

from __future__ import annotations

import contextlib

import torch

from geo.geometry import LOG_2PI, normalize


@contextlib.contextmanager
def _serial():
    """Run [c]- and [B]-sized ops on one thread.

    torch parallelises even 8192-element exp/log, and waking the second thread
    costs ~8 ms when the cores are shared (measured), 1000x the work itself.
    """
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n_threads)


def _operands(y: torch.Tensor, mu_raw: torch.Tensor, log_kappa: torch.Tensor):
    """The float64 constants of a call: ``lhs [B, 4] = [y, 1]``, ``rhs_t [4, c] = [kappa mu, log C - kappa].T``,
    ``mu [c, 3]`` (unit), ``norm [c, 1]`` (|mu_raw|), ``kappa [c]`` and ``dlogc_minus_logc [c]``
    (d log C / d log kappa - log C, for the log kappa gradient)."""
    f64 = torch.float64
    with _serial():
        y64 = normalize(y.detach().to(f64))
        m = mu_raw.detach().to(f64)
        norm = torch.linalg.vector_norm(m, dim=-1, keepdim=True).clamp_min(1e-30)
        mu = m / norm
        lk = log_kappa.detach().to(f64)
        kappa = torch.exp(lk)
        em1 = torch.expm1(-2.0 * kappa)                      # e^{-2 kappa} - 1, in (-1, 0)
        log_c = lk - LOG_2PI - torch.log(-em1)                # geometry.vmf_log_normalizer
        # d log C / d log kappa = 1 - 2 kappa / (e^{2 kappa} - 1) = 1 + 2 kappa e^{-2 kappa} / em1
        dlogc = 1.0 + 2.0 * kappa * (em1 + 1.0) / em1
        rhs_t = torch.cat([kappa[:, None] * mu, (log_c - kappa)[:, None]], dim=1).T.contiguous()
        lhs = torch.cat([y64, torch.ones_like(y64[:, :1])], dim=1)
    return lhs, rhs_t, mu, norm, kappa, dlogc - log_c


class _Buffers:
    """[rows, c] work buffers reused across the chunks of one call."""

    def __init__(self, rows: int, c: int, dtype: torch.dtype, device: torch.device):
        f64 = torch.float64
        self.log_vmf64 = torch.empty((rows, c), dtype=f64, device=device)
        # In float64 the product's buffer is the log vMF matrix itself.
        self.log_vmf = self.log_vmf64 if dtype == f64 else torch.empty((rows, c), dtype=dtype, device=device)
        self.work = torch.empty((rows, c), dtype=dtype, device=device)

    def log_vmf_into(self, lhs: torch.Tensor, rhs_t: torch.Tensor) -> torch.Tensor:
        """log vMF of a chunk, ``lhs [n, 4] @ rhs_t [4, c]``, in the logits' dtype ([n, c], a view of a buffer)."""
        n = lhs.shape[0]
        out64 = torch.mm(lhs, rhs_t, out=self.log_vmf64[:n])
        if self.log_vmf is self.log_vmf64:
            return out64
        return self.log_vmf[:n].copy_(out64)


def _softmax_top_(s: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row softmax of ``s [b, c]`` into ``out`` (default: ``s`` itself); each row's max and the softmax there.

    The softmax kernel sweeps each row once while it is in cache. Then
    logsumexp = max - log softmax_at_max, with softmax_at_max >= 1/c: full precision.
    """
    out = s if out is None else out
    top, j = torch.max(s, dim=1, keepdim=True)
    torch.ops.aten._softmax.out(s, 1, False, out=out)
    return top[:, 0], out.gather(1, j)[:, 0]


class MvMFLogDensity(torch.autograd.Function):
    """Row log-densities ``[B]`` of the mixture; see the module docstring. No gradient for ``y``."""

    @staticmethod
    def forward(ctx, logits, y, mu_raw, log_kappa, chunk_rows: int):
        n_rows, c = logits.shape
        rows = max(1, min(int(chunk_rows), n_rows))
        consts = _operands(y, mu_raw, log_kappa)
        lhs, rhs_t = consts[:2]
        # Row max and softmax-at-max of s = logits + log vMF, then of the logits.
        tops = logits.new_empty((4, n_rows))
        if n_rows:
            buf = _Buffers(rows, c, logits.dtype, logits.device)
            with torch.no_grad():
                for start in range(0, n_rows, rows):
                    chunk = logits[start:start + rows]
                    n = chunk.shape[0]
                    s = torch.add(buf.log_vmf_into(lhs[start:start + n], rhs_t), chunk, out=buf.work[:n])
                    tops[0, start:start + n], tops[1, start:start + n] = _softmax_top_(s)
                    tops[2, start:start + n], tops[3, start:start + n] = _softmax_top_(chunk, out=buf.work[:n])
        with _serial():
            out = (tops[0] - torch.log(tops[1])) - (tops[2] - torch.log(tops[3]))
        ctx.save_for_backward(logits, mu_raw, log_kappa, *consts)
        ctx.chunk_rows = rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, mu_raw, log_kappa, lhs, rhs_t, mu, norm, kappa, dlogc_minus_logc = ctx.saved_tensors
        need_logits, _, need_mu, need_kappa = ctx.needs_input_grad[:4]
        n_rows, c = logits.shape
        rows, dtype, f64 = ctx.chunk_rows, logits.dtype, torch.float64
        grad_logits = torch.empty_like(logits) if need_logits else None
        # Column sums over rows, accumulated in float64 across chunks: sum_b G_bi [y_b, 1, L_bi].
        sums = torch.zeros((5, c), dtype=f64, device=logits.device)
        if n_rows:
            buf = _Buffers(rows, c, dtype, logits.device)
            g_all = grad_out.to(dtype)
            g64 = grad_out.to(f64)
            # [y_b g_b, g_b] as contiguous row vectors, for the vector-matrix products.
            weights = torch.cat([lhs[:, :3] * g64[:, None], g64[:, None]], dim=1).to(dtype).T.contiguous()
            with torch.no_grad():
                for start in range(0, n_rows, rows):
                    chunk = logits[start:start + rows]
                    n = chunk.shape[0]
                    g = g_all[start:start + n]
                    log_vmf = buf.log_vmf_into(lhs[start:start + n], rhs_t)
                    r = torch.add(log_vmf, chunk, out=buf.work[:n])
                    torch.ops.aten._softmax.out(r, 1, False, out=r)          # responsibilities r_bi
                    if need_mu or need_kappa:
                        for k in range(4):                                     # sum_b g_b r_bi [y_b, 1]
                            sums[k] += weights[k, start:start + n] @ r
                        if need_kappa:                                         # sum_b g_b r_bi L_bi
                            sums[4] += g @ log_vmf.mul_(r)
                    if need_logits:
                        gl = grad_logits[start:start + n]
                        torch.ops.aten._softmax.out(chunk, 1, False, out=gl)  # p = softmax(logits)
                        gl.sub_(r).mul_(-g[:, None])                           # g (r - p)
        grad_mu_raw = grad_log_kappa = None
        if need_mu:
            grad_mu = kappa[:, None] * sums[:3].T                                # d out / d mu (unit), [c, 3]
            radial = (grad_mu * mu).sum(-1, keepdim=True)
            grad_mu_raw = ((grad_mu - radial * mu) / norm).to(mu_raw.dtype)
        if need_kappa:
            # d L / d log kappa = d log C / d log kappa - kappa + kappa mu.y = (d log C - log C) + L
            grad_log_kappa = (sums[3] * dlogc_minus_logc + sums[4]).to(log_kappa.dtype)
        return grad_logits, None, grad_mu_raw, grad_log_kappa, None


def mvmf_log_density_at(logits: torch.Tensor, y: torch.Tensor, mu_raw: torch.Tensor, log_kappa: torch.Tensor,
                        chunk_rows: int) -> torch.Tensor:
    """log MvMF(y_b | x_b) per steradian: ``logits [B, c], y [B, 3], mu_raw [c, 3], log_kappa [c] -> [B]``.

    ``chunk_rows`` bounds the [rows, c] buffers (two or three of them, float64 and
    the logits' dtype). The logits must be float32 or float64 on a device with float64.
    """
    return MvMFLogDensity.apply(logits, y, mu_raw, log_kappa, chunk_rows)
