"""The ``knn`` head: image retrieval (Im2GPS-deep, Vo et al.) over the train split's features.

Nothing is trained. The gallery is the train split: its features and its
locations, given once through ``fit_gallery`` (``needs_gallery = True``) as a
:class:`Gallery`, an object that serves the features in consecutive blocks. The
head keeps a reference to it and the locations' unit vectors, never the features,
and none of it is part of the head's state: a run's checkpoint holds log kappa
only. The training layer gives the head a gallery that reads the run's cache
(``geo.training.gallery``: which cache, which rows and the cache's content hash
are recorded in the run, and checked before each use); tests and small galleries
use :class:`ArrayGallery`.

Search, for a query x: the k gallery rows of highest cosine similarity s_i.
Exact by default: the gallery is streamed in blocks whose size follows from
``max_memory_mb`` (block features widened to float32 one block at a time, on the
query's device), each block's top-k merged with the running one, so memory is
bounded whatever the gallery's size and the result is brute force's. Or through
a ``search`` callable given with the gallery (an approximate FAISS index built by
the training layer, ``geo.training.knn_index``), which returns its own top-k.

Output of ``forward``: ``[B, k, 4]`` float32, per neighbour (most similar first)
its similarity and its location's unit vector. The density is a vMF kernel
density over the neighbours,

    p(y | x) = sum_i w_i vMF(y; y_i, kappa),   w_i proportional to max(s_i, 0) + 1e-6,

with one kappa chosen on val (``calibrate``: the kappa of highest mean val
log-likelihood, a grid over log kappa then a golden-section refinement), so its
NLL is comparable with every head's. Predictions: "mode" the densest point of
that density (the similarity-weighted mean shift on the sphere, from the
neighbours: ``geo.heads.mixture_modes``), "nn" the nearest neighbour's location
(k = 1 retrieval); "argmax" is "nn" (the neighbours by weight, best first).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Callable, Protocol

import numpy as np
import torch

from geo.errors import ConfigError
from geo.geometry import latlon_to_xyz, logsumexp, normalize, vmf_log_normalizer, xyz_to_latlon
from geo.heads.base import Head, VmfMixture
from geo.heads.mixture_modes import mixture_modes
from geo.heads.registry import register_head

LOG_KAPPA_GRID = np.arange(-2.0, 22.01, 0.5)  # the calibration's coarse grid of log kappa

GallerySearch = Callable[[np.ndarray, int], "tuple[np.ndarray, np.ndarray]"]
"""``search(queries [B, d] float32 unit rows, k) -> (sims [B, k] float32, gallery index [B, k] int64)``,
most similar first: an index over the gallery (FAISS), given to ``fit_gallery``."""


class Gallery(Protocol):
    """What a retrieval head reads its gallery through (the training layer provides one over a cache).

    ``n_rows``, ``feature_dim``; ``lat_deg``, ``lon_deg`` ``[n]`` float64 degrees (small: kept in memory);
    ``blocks(max_rows)`` yields the features ``[b, d]`` (any float dtype, not normalised) in gallery-row
    order, consecutive blocks of at most ``max_rows`` rows covering the gallery once.
    """

    n_rows: int
    feature_dim: int
    lat_deg: np.ndarray
    lon_deg: np.ndarray

    def blocks(self, max_rows: int) -> Iterator[np.ndarray]: ...


class ArrayGallery:
    """A :class:`Gallery` over arrays in memory: features ``[n, d]``, lat_deg, lon_deg ``[n]`` degrees."""

    def __init__(self, features, lat_deg, lon_deg):
        self.features = np.asarray(features)
        if self.features.ndim != 2:
            raise ConfigError(f"knn: gallery features must be [n, d], not {self.features.shape}")
        self.n_rows, self.feature_dim = self.features.shape
        self.lat_deg = np.asarray(lat_deg, np.float64)
        self.lon_deg = np.asarray(lon_deg, np.float64)

    def blocks(self, max_rows: int) -> Iterator[np.ndarray]:
        for start in range(0, self.n_rows, max_rows):
            yield self.features[start:start + max_rows]


def topk_cosine(queries: torch.Tensor, gallery: torch.Tensor, k: int, block_rows: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of ``queries [B, d] @ gallery [n, d].T`` (both normalised): ``(sims [B, k], index [B, k])``.

    The gallery is read ``block_rows`` rows at a time; each block's top-k is merged
    with the running one, so memory is O(B x (block_rows + k)).
    """
    merger = TopK(queries.shape[0], k, queries)
    for start in range(0, gallery.shape[0], block_rows):
        merger.add(queries @ gallery[start:start + block_rows].T, start)
    return merger.sims, merger.index


class TopK:
    """The running top-k of ``B`` queries over similarity blocks ``[B, g]`` (merged block by block)."""

    def __init__(self, n_queries: int, k: int, like: torch.Tensor):
        self.k = k
        self.sims = like.new_full((n_queries, 0), -math.inf)
        self.index = torch.zeros((n_queries, 0), dtype=torch.int64, device=like.device)

    def add(self, sims: torch.Tensor, start: int) -> None:
        """Merge a block of similarities ``[B, g]`` whose columns are gallery rows ``start .. start + g``."""
        s, i = torch.topk(sims, min(self.k, sims.shape[1]), dim=1)
        both = torch.cat([self.sims, s], 1)
        self.sims, order = torch.topk(both, min(self.k, both.shape[1]), dim=1)
        self.index = torch.gather(torch.cat([self.index, i + start], 1), 1, order)


@register_head("knn")
class KnnHead(Head):
    """k-nearest-neighbour retrieval by cosine similarity over the train split (see the module docstring).

    Args:
        feature_dim: d, the width of the features.
        k: neighbours per query.
        max_memory_mb: bound on the exact search's temporaries (a gallery block as read, widened to
            float32, and its ``[B, block]`` similarities); sets the gallery rows per block.
        block_rows: gallery rows per block, overriding ``max_memory_mb`` (memory, never results).
    """

    has_density = True
    predict_modes = ("mode", "nn", "argmax")
    trainable = False
    needs_gallery = True
    needs_calibration = True

    def __init__(self, feature_dim: int, *, k: int = 16, max_memory_mb: float = 2048, block_rows: int | None = None):
        super().__init__(feature_dim)
        if int(k) < 1 or (block_rows is not None and int(block_rows) < 1) or not max_memory_mb > 0:
            raise ConfigError(f"knn: k and block_rows must be >= 1 and max_memory_mb > 0, not "
                              f"{k}, {block_rows}, {max_memory_mb}")
        self.k, self.max_memory_mb = int(k), float(max_memory_mb)
        self.block_rows = None if block_rows is None else int(block_rows)
        self.gallery: Gallery | None = None
        self.search: GallerySearch | None = None
        self.gallery_xyz = torch.zeros(0, 3, dtype=torch.float64)  # not a buffer: never in the state
        # Seconds and queries spent searching, exactly and through the index (what benchmarks compare).
        self.search_stats = {"exact_s": 0.0, "exact_queries": 0, "index_s": 0.0, "index_queries": 0}
        self.register_buffer("log_kappa", torch.tensor(3.0))
        self.options = {"k": self.k, "max_memory_mb": self.max_memory_mb}

    @classmethod
    def options_from_config(cls, config: dict) -> dict:
        return dict(k=int(config.get("knn_k") or 16), max_memory_mb=float(config.get("max_memory_mb") or 2048))

    @property
    def max_k(self) -> int:
        return self.k

    def fit_gallery(self, gallery, lat_deg=None, lon_deg=None, *, search: GallerySearch | None = None) -> None:
        """Attach the gallery: a :class:`Gallery`, or features ``[n, d]`` with lat_deg, lon_deg ``[n]`` (degrees).

        ``search``: an index over the gallery (``GallerySearch``) that replaces the exact search.
        Only a reference is kept (and the locations' unit vectors): nothing of it enters the state.
        """
        if lat_deg is not None or lon_deg is not None:
            gallery = ArrayGallery(gallery, lat_deg, lon_deg)
        if gallery.feature_dim != self.feature_dim or gallery.n_rows < self.k:
            raise ConfigError(f"knn: the gallery must be [n >= k = {self.k}, {self.feature_dim}] features, "
                              f"not [{gallery.n_rows}, {gallery.feature_dim}]")
        self.gallery, self.search = gallery, search
        self.gallery_xyz = torch.from_numpy(latlon_to_xyz(np.asarray(gallery.lat_deg, np.float64),
                                                          np.asarray(gallery.lon_deg, np.float64)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Runs written before galleries were referenced kept them in the state: ignore those copies.
        for name in ("gallery_features", "gallery_xyz"):
            state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def gallery_block_rows(self, n_queries: int) -> int:
        """Gallery rows per block of the exact search for ``n_queries`` queries (``max_memory_mb``'s bound).

        Per gallery row a block holds the row as read (<= 8 bytes per feature), widened (4 or 8
        bytes per feature) and one similarity per query (4 or 8 bytes) plus its top-k merge.
        """
        if self.block_rows is not None:
            return self.block_rows
        width = self.log_kappa.element_size()
        per_row = self.feature_dim * (8 + width) + 2 * width * max(1, n_queries)
        return max(self.k, int(self.max_memory_mb * 2**20) // per_row)

    @torch.no_grad()
    def exact_topk(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k by cosine similarity of ``queries [B, d]`` (unit rows) over the streamed gallery.

        Returns ``(sims [B, k], gallery index [B, k] int64)``, most similar first, on the queries'
        device and dtype. Each block is widened to the queries' dtype and its rows' norms are
        divided out of the similarities (a [B, g] scaling instead of normalising [g, d]).
        """
        t0 = time.perf_counter()
        merger = TopK(queries.shape[0], self.k, queries)
        start = 0
        for block in self.gallery.blocks(self.gallery_block_rows(queries.shape[0])):
            x = torch.from_numpy(np.ascontiguousarray(block)).to(queries.device).to(queries.dtype)
            inv_norm = 1.0 / torch.linalg.vector_norm(x, dim=1).clamp_min(torch.finfo(queries.dtype).tiny)
            merger.add((queries @ x.T).mul_(inv_norm), start)
            start += x.shape[0]
        if start != self.gallery.n_rows:
            raise ConfigError(f"knn: the gallery served {start} rows, expected {self.gallery.n_rows}")
        self.search_stats["exact_s"] += time.perf_counter() - t0
        self.search_stats["exact_queries"] += queries.shape[0]
        return merger.sims, merger.index

    def index_topk(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k of ``queries [B, d]`` (unit rows) from the ``search`` index (exact search without one)."""
        if self.search is None:
            return self.exact_topk(queries)
        t0 = time.perf_counter()
        sims, index = self.search(queries.detach().to("cpu", torch.float32).numpy(), self.k)
        self.search_stats["index_s"] += time.perf_counter() - t0
        self.search_stats["index_queries"] += queries.shape[0]
        sims = torch.from_numpy(np.asarray(sims)).to(queries.device, queries.dtype)
        index = torch.from_numpy(np.asarray(index, np.int64)).to(queries.device)
        short = (index < 0).any(dim=1)  # the index found fewer than k rows (e.g. IVF lists probed too small)
        if bool(short.any()):
            sims[short], index[short] = self.exact_topk(queries[short])
        return sims, index

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """The k neighbours ``[B, k, 4]``: cosine similarity, then the unit vector of the neighbour's location."""
        if self.gallery is None:
            raise ConfigError("knn: no gallery; fit_gallery(gallery) first (a run's head gets its cache's)")
        queries = normalize(features.to(self.log_kappa.device, self.log_kappa.dtype))
        sims, index = self.index_topk(queries)
        xyz = self.gallery_xyz[index.cpu()].to(queries.device, queries.dtype)
        return torch.cat([sims[..., None], xyz], dim=-1)

    def _mixture(self, output: torch.Tensor):
        """(log weights [B, k], unit means [B, k, 3], log kappa []) of the kernel density."""
        log_w = torch.log(output[..., 0].clamp_min(0.0) + 1e-6)
        return log_w - torch.logsumexp(log_w, dim=-1, keepdim=True), normalize(output[..., 1:4]), \
            self.log_kappa.to(output)

    def _log_density_rows(self, output, points, log_kappa=None):  # points [B, G, 3] -> [B, G]
        log_w, mu, lk = self._mixture(output)
        lk = lk if log_kappa is None else log_kappa
        sq_chord = (points[:, :, None, :] - mu[:, None, :, :]).pow(2).sum(-1)              # [B, G, k]
        return logsumexp(log_w[:, None, :] + vmf_log_normalizer(lk) - 0.5 * torch.exp(lk) * sq_chord, dim=-1)

    def log_density_at(self, output: torch.Tensor, target_xyz: torch.Tensor) -> torch.Tensor:
        """log p(y_b | x_b) per steradian: ``[B, k, 4], [B, 3] -> [B]``."""
        return self._log_density_rows(output, torch.as_tensor(target_xyz).to(output)[:, None, :])[:, 0]

    def log_density(self, output: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        """log p(g | x_b) per steradian on a grid: ``[B, k, 4], [G, 3] -> [B, G]``."""
        grid = torch.as_tensor(xyz).to(output)
        rows = max(1, 2**24 // max(1, output.shape[0] * self.k))
        parts = [self._log_density_rows(output, grid[None, g:g + rows].expand(output.shape[0], -1, -1))
                 for g in range(0, grid.shape[0], rows)]
        return torch.cat(parts, dim=1) if parts else output.new_zeros((output.shape[0], 0))

    def loss(self, output: torch.Tensor, target_xyz: torch.Tensor) -> torch.Tensor:
        """Mean NLL (nats per steradian); nothing is trained with it (``trainable = False``)."""
        return -self.log_density_at(output, target_xyz).mean()

    @torch.no_grad()
    def calibrate(self, outputs: torch.Tensor, target_xyz: torch.Tensor) -> None:
        """kappa of highest mean log-likelihood of the val points ``[n, 3]`` under their densities (float64)."""
        out = outputs.detach().to("cpu", torch.float64)
        y = torch.as_tensor(target_xyz).detach().to("cpu", torch.float64)
        log_w, mu, _ = self._mixture(out)
        sq_chord = (y[:, None, :] - mu).pow(2).sum(-1)                  # [n, k], once for every kappa tried

        def mean_ll(log_kappa: float) -> float:
            lk = torch.tensor(log_kappa, dtype=torch.float64)
            return float(logsumexp(log_w + vmf_log_normalizer(lk) - 0.5 * torch.exp(lk) * sq_chord, -1).mean())

        scores = [mean_ll(v) for v in LOG_KAPPA_GRID]
        best = int(np.argmax(scores))
        lo, hi = LOG_KAPPA_GRID[max(best - 1, 0)], LOG_KAPPA_GRID[min(best + 1, len(LOG_KAPPA_GRID) - 1)]
        ratio = (math.sqrt(5) - 1) / 2
        for _ in range(40):  # golden section on the bracket around the grid's best
            a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
            lo, hi = (lo, b) if mean_ll(a) >= mean_ll(b) else (a, hi)
        self.log_kappa.fill_(0.5 * (lo + hi))

    def vmf_mixture(self, output_row: torch.Tensor) -> VmfMixture:
        with torch.no_grad():
            log_w, mu, lk = self._mixture(torch.as_tensor(output_row).detach().double().cpu()[None])
            return VmfMixture(log_w[0], mu[0], lk.expand(self.k).clone())

    def mixture_parts(self, output: torch.Tensor):
        """``(log w [B, k], neighbours [B, k, 3], log kappa [B, k])`` float64 on the CPU (the kernel density)."""
        with torch.no_grad():
            log_w, mu, lk = self._mixture(torch.as_tensor(output).detach().to("cpu", torch.float64))
            return log_w, mu, lk.expand(log_w.shape).clone()

    def topk(self, output: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k largest kernel weights ``[B, k]`` and their neighbour ranks ``[B, k]`` int64."""
        k = self._check_k(k)
        return torch.topk(torch.exp(self._mixture(output.float())[0]), k, dim=-1)

    def predict(self, output: torch.Tensor, k: int = 1, mode: str = "mode") -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted locations ``(lat_deg [B, k], lon_deg [B, k])``, float64 degrees (module docstring)."""
        k = self._check_k(k)
        self._check_mode(mode)
        with torch.no_grad():
            out = output.detach().to("cpu", torch.float64)
            log_w, mu, log_kappa = self._mixture(out)
            if mode == "mode" and out.shape[0]:
                points = mixture_modes(log_w, mu, log_kappa.expand(log_w.shape), k, 8, 10_000)
            else:  # neighbours by similarity, most similar first (the order of forward's output)
                points = mu[:, :k]
        return xyz_to_latlon(points)
