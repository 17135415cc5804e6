"""The MvMF log-likelihood per row as one autograd Function, in row chunks with reused buffers.

    log MvMF(y_b | x_b) = logsumexp_i(logits_bi + log vMF(y_b; mu_i, kappa_i)) - logsumexp_i(logits_bi)

``mvmf_log_density_at(logits [B, c], y [B, 3], mu_raw [c, 3], log_kappa [c]) -> [B]``
(nats per steradian). ``mu_raw`` is normalised here, and its gradient goes back
through the normalisation.

Why a Function and not autograd on the expression: autograd keeps every [B, c]
intermediate and allocates a fresh one per op, and on CPU a fresh 32 MB tensor
costs more in page faults than the pass that fills it. Here forward goes over row
chunks small enough to stay in the last-level cache (``CACHE_CHUNK_BYTES`` of float64
per chunk), and the row-wise softmax kernel (max, exp, sum and scale in one sweep of
each row) does the exponentials. The exponentials are the cost (on a 2-core AVX2
CPU a softmax takes ~3 ns per element, a copy or add 0.3-0.9), so each element is
exponentiated twice per training step, both times in forward:

- forward: L = [y, 1] @ [kappa mu, log C - kappa].T in float64 (the exact form,
  see below), rounded into the logits' dtype; s = logits + L; r = softmax(s) and
  p = softmax(logits), whose values at their row maxima give the two row
  logsumexps. In training r and p ([B, c] each, the logits' dtype) are kept for
  backward; in evaluation (no input needs a gradient) they live in one chunk's buffer;
- backward (g = d out / d row): d logits = g (r - p); with G = g r, one float64
  product over row chunks gives S = sum_b G_bi [y_b, 1] ([4, c]); then
  d mu_i = kappa_i S_i[:3] and d log kappa_i = sum_b G_bi (d log C_i - log C_i + L_bi)
  = (d log C_i - log C_i) S_i[3] + sum_k rhs_ki S_ki (L is bilinear in [y, 1] and
  rhs = [kappa mu, log C - kappa]), no [B, c] log vMF recomputed; then through the
  normalisation of mu_raw in float64 on [c, 3].

The log vMF matrix: for unit vectors log vMF = log C(kappa) - kappa + kappa mu.y,
one K = 4 float64 matrix product whose error is ~1e-16 kappa nats (1e-9 at
kappa = e^16; in float32 this form would be the "kappa (mu.y - 1)" pitfall of
PAPER.md, off by ~1 nat). Measured here ([1024, 8192] into a reused buffer): the
float64 K = 4 product takes about as long as a float32 one (13-24 ms each, memory
bound), so an exact float32 alternative (a hi/lo split of y and mu: two float32
products and a scaling pass) would not be faster; the rounding to float32 is one
more pass. Measured error of the float32 loss against a float64 reference at
kappa = e^16: <= 4e-7 nats within 30 km of a mean, <= 5e-8 relative beyond.

Precision of the gradients in float32: d logits to float32 rounding of r - p;
d mu and d log kappa from S, accumulated in float64 from the float32 r (the
cancellation kappa (mu.S[:3] - S[3]) in d log kappa loses ~1e-16 kappa relative,
1e-9 at kappa = e^16), so their error is that of r itself (~6e-8 relative).
A float64 head (``head.double()``) does everything in float64.
"""

from __future__ import annotations

import contextlib

import torch

from geo.geometry import LOG_2PI, normalize

# Float64 bytes of one forward/backward chunk: small enough that its passes stay in
# the last-level cache (8 MiB here); measured at c = 2^13, one thread: 218-225 ms a
# step for 16-256-row chunks against 271 ms for one 1024-row chunk.
CACHE_CHUNK_BYTES = 16 * 2**20


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


def _softmax_top_(s: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row softmax of ``s [b, c]`` into ``out`` (default: ``s`` itself); each row's max and the softmax there.

    The softmax kernel sweeps each row once while it is in cache. Then
    logsumexp = max - log softmax_at_max, with softmax_at_max >= 1/c: full precision.
    """
    out = s if out is None else out
    top = torch.amax(s, dim=1)                                # amax: ~10x faster than max with indices
    torch.ops.aten._softmax.out(s, 1, False, out=out)
    return top, torch.amax(out, dim=1)                         # the largest softmax value is the one at the max


class MvMFLogDensity(torch.autograd.Function):
    """Row log-densities ``[B]`` of the mixture; see the module docstring. No gradient for ``y``."""

    @staticmethod
    def forward(ctx, logits, y, mu_raw, log_kappa, chunk_rows: int):
        n_rows, c = logits.shape
        rows = max(1, min(int(chunk_rows), n_rows))
        consts = _operands(y, mu_raw, log_kappa)
        lhs, rhs_t = consts[:2]
        need_logits, _, need_mu, need_kappa = ctx.needs_input_grad[:4]
        training = need_logits or need_mu or need_kappa
        # Training keeps r = softmax(logits + log vMF) and p = softmax(logits) for backward ([B, c] each);
        # evaluation writes them into one chunk's buffers.
        full = (n_rows, c) if training else (rows, c)
        r_all = logits.new_empty(full)
        p_all = logits.new_empty(full) if training else r_all
        # Row max and softmax-at-max of s = logits + log vMF, then of the logits.
        tops = logits.new_empty((4, n_rows))
        if n_rows:
            log_vmf64 = torch.empty((rows, c), dtype=torch.float64, device=logits.device)
            with torch.no_grad():
                for start in range(0, n_rows, rows):
                    chunk = logits[start:start + rows]
                    n = chunk.shape[0]
                    at = slice(start, start + n) if training else slice(0, n)
                    torch.mm(lhs[start:start + n], rhs_t, out=log_vmf64[:n])
                    # s = log vMF (rounded to the logits' dtype) + logits: a mixed-dtype add would be ~4x slower.
                    s = r_all[at].copy_(log_vmf64[:n]).add_(chunk)
                    tops[0, start:start + n], tops[1, start:start + n] = _softmax_top_(s)
                    tops[2, start:start + n], tops[3, start:start + n] = _softmax_top_(chunk, out=p_all[at])
        with _serial():
            out = (tops[0] - torch.log(tops[1])) - (tops[2] - torch.log(tops[3]))
        if training:
            ctx.save_for_backward(r_all, p_all, mu_raw, log_kappa, *consts)
        ctx.chunk_rows = rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        r_all, p_all, mu_raw, log_kappa, lhs, rhs_t, mu, norm, kappa, dlogc_minus_logc = ctx.saved_tensors
        need_logits, _, need_mu, need_kappa = ctx.needs_input_grad[:4]
        n_rows, c = r_all.shape
        rows, dtype, f64 = ctx.chunk_rows, r_all.dtype, torch.float64
        grad_logits = torch.empty_like(r_all) if need_logits else None
        # sum_b g_b r_bi [y_b, 1] in float64 ([4, c]): a float64 product over row chunks.
        sums = torch.zeros((4, c), dtype=f64, device=r_all.device)
        if n_rows:
            g_all = grad_out.to(dtype)
            g64 = grad_out.to(f64)
            weights = torch.cat([lhs[:, :3] * g64[:, None], g64[:, None]], dim=1).T.contiguous()  # [4, B]
            r64_buf = None if dtype == f64 else torch.empty((rows, c), dtype=f64, device=r_all.device)
            with torch.no_grad():
                for start in range(0, n_rows, rows):
                    r = r_all[start:start + rows]
                    n = r.shape[0]
                    if need_mu or need_kappa:
                        r64 = r if r64_buf is None else r64_buf[:n].copy_(r)
                        sums.addmm_(weights[:, start:start + n], r64)
                    if need_logits:                                            # g (r - p)
                        gl = torch.sub(r, p_all[start:start + n], out=grad_logits[start:start + n])
                        gl.mul_(g_all[start:start + n, None])
        grad_mu_raw = grad_log_kappa = None
        if need_mu:
            grad_mu = kappa[:, None] * sums[:3].T                                # d out / d mu (unit), [c, 3]
            radial = (grad_mu * mu).sum(-1, keepdim=True)
            grad_mu_raw = ((grad_mu - radial * mu) / norm).to(mu_raw.dtype)
        if need_kappa:
            # d L / d log kappa = d log C / d log kappa - kappa + kappa mu.y = (d log C - log C) + L, and
            # sum_b g_b r_bi L_bi = sum_k rhs_t[k, i] sums[k, i] because L = lhs @ rhs_t is bilinear.
            with_l = (rhs_t * sums).sum(0)
            grad_log_kappa = (sums[3] * dlogc_minus_logc + with_l).to(log_kappa.dtype)
        return grad_logits, None, grad_mu_raw, grad_log_kappa, None


def mvmf_log_density_at(logits: torch.Tensor, y: torch.Tensor, mu_raw: torch.Tensor, log_kappa: torch.Tensor,
                        chunk_rows: int) -> torch.Tensor:
    """log MvMF(y_b | x_b) per steradian: ``logits [B, c], y [B, 3], mu_raw [c, 3], log_kappa [c] -> [B]``.

    ``chunk_rows`` bounds the [rows, c] work buffers (a float64 one and, in evaluation, one of
    the logits' dtype); chunks are further cut to ``CACHE_CHUNK_BYTES``. In training two
    [B, c] tensors of the logits' dtype are kept for backward. The logits must be float32
    or float64 on a device with float64.
    """
    rows = max(1, min(int(chunk_rows), CACHE_CHUNK_BYTES // (8 * max(logits.shape[1], 1))))
    return MvMFLogDensity.apply(logits, y, mu_raw, log_kappa, rows)
