"""Approximate search for the knn head: a FAISS index over a run's gallery, built once and kept beside the cache.

``--knn-index`` (``FitConfig.knn_index``):

- ``exact`` (default): no index; the head streams the gallery (``geo.heads.knn``);
- ``flat``: FAISS ``IndexFlatIP`` over the unit rows (exact, float32 in memory: 4 n d bytes);
- ``ivf``: ``IVF<nlist>_HNSW32,SQ8``, an inverted file of nlist ~ sqrt(n) / 2 k-means lists (a power
  of 2; rows assigned to lists through an HNSW graph over the centroids) holding the rows as 8-bit
  scalar-quantised codes (n d bytes), searching ``--knn-nprobe`` lists;
- ``hnsw``: ``HNSW32,SQ8``, a graph over the same 8-bit codes (efSearch = max(4 nprobe, 2 k)).

An index is built from the gallery's blocks (k-means / quantiser trained on an evenly
strided sample of at most 40 nlist rows, then rows added block by block, normalised to
float32 one block at a time) and written next to the cache as
``<cache>.knn/<kind>-<cache sha256[:16]>-<rows sha256[:12]>.faiss`` with a JSON of its facts
(build seconds, parameters): keyed by the cache's content hash and the gallery's rows, so
every run over the same gallery reuses it and a changed cache never meets a stale index.
Approximate indexes may miss neighbours, and their 8-bit codes misorder near-equal ones (photos
of one place are near-duplicates): ``--knn-rerank R`` (default 4) has the index propose R k
candidates per query, re-scored exactly from the cache's stored features (``rerank_exactly``,
read through the page cache by ``geo.cache.row_reader``), so the similarities a run uses are
exact and only candidates the index never proposed are missed. On a 4.7M x 768 gallery of
near-duplicates, IVF with nprobe 64 had recall@16 0.939 without it. The run records the
index's recall@k against exact search on val (``index_recall``) in metrics.json.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from geo.errors import ConfigError
from geo.files import atomic_write_text, temporary_path

KNN_INDEXES = ("exact", "flat", "ivf", "hnsw")
INDEX_FORMAT = "geo-knn-index/1"
_SAMPLE_PER_LIST = 40  # k-means training rows per IVF list (FAISS warns below 39)


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ConfigError("--knn-index flat|ivf|hnsw needs FAISS: pip install 'geo-mvmf[faiss]' "
                          "(faiss-cpu), or use --knn-index exact") from None
    return faiss


def n_lists(n_rows: int) -> int:
    """IVF lists for a gallery of ``n_rows``: the power of 2 nearest sqrt(n) / 2, at most n / 40 (k-means needs
    rows). Fewer, longer lists than the usual sqrt(n): the k-means (on 40 rows per list) stays minutes on a
    2-core CPU at n = 4.5M, and a probed list holds more of a query's neighbours."""
    target = max(1.0, math.sqrt(n_rows) / 2)
    return int(max(1, min(2 ** round(math.log2(target)), n_rows // _SAMPLE_PER_LIST or 1)))


def factory_string(kind: str, n_rows: int) -> str:
    """The ``faiss.index_factory`` description of an index kind for a gallery of ``n_rows``."""
    if kind == "flat":
        return "Flat"
    if kind == "ivf":  # rows are assigned to lists through an HNSW graph over the centroids: not n x nlist products
        return f"IVF{n_lists(n_rows)}_HNSW32,SQ8"
    if kind == "hnsw":
        return "HNSW32,SQ8"
    raise ConfigError(f"--knn-index {kind!r}: choose one of {', '.join(KNN_INDEXES)}")


def index_path(gallery, kind: str) -> Path:
    """Where the index of ``kind`` over ``gallery`` (a ``CacheGallery``) lives, keyed by its content and rows."""
    return gallery.path.parent / f"{gallery.path.name}.knn" / (
        f"{kind}-{gallery.sha256[:16]}-{gallery.record['rows_sha256'][:12]}.faiss")


def _unit_float32(block: np.ndarray) -> np.ndarray:
    x = np.asarray(block, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float32).tiny)


def _block_rows(gallery, max_bytes: int = 256 << 20) -> int:
    return max(1, max_bytes // (gallery.feature_dim * 8))


def build_index(gallery, kind: str):
    """A FAISS index of ``kind`` over the unit rows of ``gallery``, trained and filled block by block."""
    faiss = _faiss()
    description = factory_string(kind, gallery.n_rows)
    index = faiss.index_factory(gallery.feature_dim, description, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        sample_rows = min(gallery.n_rows, _SAMPLE_PER_LIST * max(n_lists(gallery.n_rows), 256))
        stride = max(1, gallery.n_rows // sample_rows)
        sample, start = [], 0
        for block in gallery.blocks(_block_rows(gallery)):  # every stride-th gallery row
            sample.append(_unit_float32(block[(-start) % stride::stride]))
            start += block.shape[0]
        index.train(np.concatenate(sample)[:sample_rows])
    for block in gallery.blocks(_block_rows(gallery)):
        index.add(_unit_float32(block))
    return index, description


def open_or_build_index(gallery, kind: str, *, nprobe: int, k: int, rerank: int = 1, progress: bool = False):
    """``(search, facts)``: the index of ``kind`` over ``gallery``, read from its file or built and written once.

    ``search(queries [B, d] float32 unit rows, k) -> (sims [B, k], index [B, k])`` (``GallerySearch``);
    ``facts``: ``knn_index``, ``knn_index_factory``, ``knn_index_path``, ``knn_index_build_s``,
    ``knn_nprobe``, ``knn_rerank``, for metrics.json. ``rerank`` > 1 (ivf, hnsw): the index proposes
    ``rerank * k`` candidates, which ``rerank_exactly`` re-scores from the gallery's stored features.
    """
    faiss = _faiss()
    path = index_path(gallery, kind)
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        index = faiss.read_index(str(path))
        meta = json.loads(meta_path.read_text())
    else:
        if progress:
            print(f"building the {kind} index over {gallery.n_rows} gallery rows (once): {path}", flush=True)
        t0 = time.perf_counter()
        index, description = build_index(gallery, kind)
        meta = {"format": INDEX_FORMAT, "kind": kind, "factory": description, "build_s": time.perf_counter() - t0,
                "n_rows": gallery.n_rows, "cache_path": str(gallery.path), "cache_sha256": gallery.sha256,
                "rows_sha256": gallery.record["rows_sha256"]}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_path(path)
        faiss.write_index(index, str(tmp))
        os.replace(tmp, path)
        atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    if index.ntotal != gallery.n_rows:
        raise ConfigError(f"{path}: the index holds {index.ntotal} rows, the gallery {gallery.n_rows}; delete it "
                          "to rebuild")
    if kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = int(nprobe)
    elif kind == "hnsw":
        index.hnsw.efSearch = max(4 * int(nprobe), 2 * k)

    approximate = kind in ("ivf", "hnsw")
    rerank = max(1, int(rerank)) if approximate else 1

    def search(queries: np.ndarray, k: int):
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if rerank == 1:
            return index.search(queries, k)
        _, candidates = index.search(queries, min(gallery.n_rows, rerank * k))
        return rerank_exactly(queries, candidates, gallery, k)

    facts = {"knn_index": kind, "knn_index_factory": meta["factory"], "knn_index_path": str(path),
             "knn_index_build_s": meta["build_s"], "knn_nprobe": int(nprobe) if approximate else None,
             "knn_rerank": rerank if approximate else None}
    return search, facts


def rerank_exactly(queries: np.ndarray, candidates: np.ndarray, gallery, k: int, *, block: int = 256):
    """The top-``k`` of each query's ``candidates`` by exact cosine similarity: ``(sims [B, k], rows [B, k])``.

    ``queries [B, d]`` float32 unit rows; ``candidates [B, m]`` gallery positions (-1: none). The candidates'
    features are read from the cache (``gallery.read_rows``), widened to float32 and divided by their norms,
    as exact search scores them; a query with fewer than k valid candidates gets -1 / -inf in the slots left.
    """
    n, m = candidates.shape
    sims = np.full((n, k), -np.inf, dtype=np.float32)
    rows = np.full((n, k), -1, dtype=np.int64)
    for start in range(0, n, block):
        cand = candidates[start:start + block]
        valid = cand >= 0
        x = np.zeros(cand.shape + (gallery.feature_dim,), dtype=np.float32)
        x[valid] = gallery.read_rows(cand[valid])
        norms = np.maximum(np.linalg.norm(x, axis=2), np.finfo(np.float32).tiny)
        score = np.einsum("bmd,bd->bm", x, queries[start:start + block]) / norms
        score[~valid] = -np.inf
        top = np.argsort(-score, axis=1, kind="stable")[:, :k]
        sims[start:start + block, :top.shape[1]] = np.take_along_axis(score, top, 1)
        rows[start:start + block, :top.shape[1]] = np.where(np.take_along_axis(valid, top, 1),
                                                            np.take_along_axis(cand, top, 1), -1)
    return sims, rows


@torch.no_grad()
def index_recall(head, batches, device: torch.device) -> float:
    """Mean recall@k of the head's index against its exact search over query ``batches`` ([b, d] features).

    Per query, the fraction of the exact k nearest gallery rows the index returns (queries in float32).
    """
    from geo.geometry import normalize

    found = total = 0
    for features in batches:
        q = normalize(torch.from_numpy(np.ascontiguousarray(features)).to(device).to(torch.float32))
        approx = head.index_topk(q)[1].cpu()
        exact = head.exact_topk(q)[1].cpu()
        found += int((approx[:, :, None] == exact[:, None, :]).any(-1).sum())
        total += exact.numel()
    return found / max(1, total)
