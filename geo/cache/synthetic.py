"""A feature cache whose locations come from a known conditional density: the oracle of every head's NLL.

Each row has a hidden scene ``(anchor a, level s, pattern j)``: ``a`` one of ``n_anchors``
real photo locations (given by the caller, e.g. geoclip's MP-16 sample), ``s`` how
localisable the image is (``LEVELS``: a city, a region or a continent: the paper's
strongly and weakly localisable images), ``j`` one of ``len(PATTERNS)`` mixing patterns.
Its location is drawn from the vMF mixture

    p(y | a, s, j) = sum_m PATTERNS[j][m] vMF(y; anchor_{n_m(a)}, kappa_s),   m = 0, 1, 2

over the anchor and its two nearest other anchors (n_0(a) = a). The features are
``code_a + code_s + code_j + noise`` (Gaussian codes of scale ``CODE_SCALE`` per dimension,
unit noise): the scene is recoverable from the features with a posterior error below
e^-100 (codes ~ sqrt(2 d) CODE_SCALE apart, noise 1), so ``p(y | features)`` *is* this
mixture, and its log-density at the row's location is the oracle: no head can have a
lower expected NLL. It is written beside the cache, ``<cache stem>.oracle.parquet``
(columns ``id``, ``oracle_log_density`` in nats per steradian, ``level``), read by ``geo report``.

**Size.** A head's gap to the oracle on the test split is its capacity gap plus its estimation
gap, and the second depends on how many training rows each scene has: there are
``12 n_anchors`` scenes (768 at the default 64 anchors). At 20,000 rows (~21 training rows a
scene) a linear MvMF at c = 1024 (kappa0 = 8, 30 epochs at batch 256) is +0.94 nats from the
oracle on test but -0.11 on its own training rows: it fits the sampled points, the
continent-wide rows most (+2.7 on test). At 100,000 rows the same fit is +0.34 on test, -0.05
on train. At 20,000 rows the sample, not the head's family, sets the gap: hence
``DEFAULT_ROWS = 100_000`` (26 MB at d = 64).

**Why additive codes.** A head linear in the features gets logits additive in (a, s, j), so it
cannot express every interaction of the scene (how pattern j's weights fall on anchor a's own
neighbours, say); a real backbone's embedding is no sum of independent codes either. That bound
on the linear heads is kept, because it is what a deep trunk (``--trunk-depth``) is for, and it
is measured to be small: at 100,000 rows in the README's CPU budget (10 epochs at batch 1024,
lr 1e-2) the linear MvMF is +0.23 nats from the oracle, with a 2 x 256 trunk +0.12 (README:
"A benchmark where the true density is known").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from geo.cache.writer import CacheWriter
from geo.geometry import latlon_to_xyz, xyz_to_latlon

# log kappa per localisability level: half-mass radii 83 km, 480 km and 1,679 km (the angle θ with
# (1 - e^(-κ(1 - cos θ))) / (1 - e^(-2κ)) = 1/2, times 6371 km)
LEVELS = {"city": 9.0, "region": 5.5, "continent": 3.0}
LEVEL_PROBS = (0.4, 0.4, 0.2)
PATTERNS = ((1.0, 0.0, 0.0), (0.7, 0.3, 0.0), (0.5, 0.3, 0.2), (0.34, 0.33, 0.33))
CODE_SCALE = 3.0
DEFAULT_ROWS = 100_000  # ~130 training rows per scene at 64 anchors (module docstring: Size)
DEFAULT_ANCHORS = 64


def oracle_path(cache_path: str | Path) -> Path:
    """Where the oracle log-densities of a synthetic cache are: ``<stem>.oracle.parquet`` beside it."""
    cache_path = Path(cache_path)
    return cache_path.with_name(cache_path.stem + ".oracle.parquet")


def pick_anchors(lat_deg: np.ndarray, lon_deg: np.ndarray, n_anchors: int = DEFAULT_ANCHORS, *,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n_anchors`` distinct locations of ``lat_deg, lon_deg`` (e.g. MP-16's photos), seeded: the anchors."""
    pick = np.random.default_rng(seed).choice(len(lat_deg), n_anchors, replace=False)
    return np.asarray(lat_deg)[pick], np.asarray(lon_deg)[pick]


def _log_vmf(y: np.ndarray, mu: np.ndarray, log_kappa: np.ndarray) -> np.ndarray:
    """log vMF(y; mu, kappa) per steradian, float64, in the chord form (exact for large kappa)."""
    kappa = np.exp(log_kappa)
    return log_kappa - np.log(2 * np.pi) - np.log1p(-np.exp(-2 * kappa)) - 0.5 * kappa * ((y - mu) ** 2).sum(-1)


def sample_vmf(mu: np.ndarray, kappa: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row from vMF(mu [n, 3], kappa [n]) (Wood's exact method for S²)."""
    n = len(mu)
    u = rng.uniform(size=n)
    # w = 1 + log(u + (1 - u) e^{-2 kappa}) / kappa: the inverse CDF of mu.y
    w = 1.0 + np.log(u + (1.0 - u) * np.exp(-2.0 * kappa)) / kappa
    phi = rng.uniform(0, 2 * np.pi, n)
    helper = np.where(np.abs(mu[:, :1]) < 0.9, np.array([[1.0, 0, 0]]), np.array([[0, 1.0, 0]]))
    e1 = np.cross(mu, helper)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = np.cross(mu, e1)
    r = np.sqrt(np.clip(1 - w * w, 0, None))[:, None]
    y = w[:, None] * mu + r * (np.cos(phi)[:, None] * e1 + np.sin(phi)[:, None] * e2)
    return y / np.linalg.norm(y, axis=1, keepdims=True)


def synthetic_rows(anchor_lat_deg, anchor_lon_deg, *, n: int, feature_dim: int, seed: int = 0) -> dict:
    """The rows of a synthetic cache (numpy): features, lat/lon (degrees), split, oracle log-density.

    ``anchor_lat_deg, anchor_lon_deg [A]``: the anchors (A >= 3). Besides the cache's columns it
    returns each row's scene (``anchor``, ``level``, ``pattern``), the anchors' ``neighbours [A, 3]``
    and the ``codes [A + len(LEVELS) + len(PATTERNS), d]`` of the anchors, levels and patterns.
    """
    rng = np.random.default_rng(seed)
    anchors = latlon_to_xyz(np.asarray(anchor_lat_deg, float), np.asarray(anchor_lon_deg, float))
    n_anchors = len(anchors)
    if n_anchors < 3:
        raise ValueError(f"need at least 3 anchors, got {n_anchors}")
    neighbours = np.argsort(-(anchors @ anchors.T), axis=1)[:, :3]  # itself, then the two nearest
    log_kappas = np.array(list(LEVELS.values()))
    patterns = np.array(PATTERNS)
    a = rng.integers(n_anchors, size=n)
    s = rng.choice(len(LEVELS), size=n, p=LEVEL_PROBS)
    j = rng.integers(len(PATTERNS), size=n)
    weights = patterns[j]                                                   # [n, 3]
    mus = anchors[neighbours[a]]                                            # [n, 3, 3]
    log_kappa = log_kappas[s]
    component = np.array([rng.choice(3, p=w) for w in weights])
    y = sample_vmf(mus[np.arange(n), component], np.exp(log_kappa), rng)
    with np.errstate(divide="ignore"):
        log_terms = np.log(weights) + _log_vmf(y[:, None, :], mus, log_kappa[:, None])
    top = log_terms.max(1)
    oracle = top + np.log(np.exp(log_terms - top[:, None]).sum(1))
    codes = rng.normal(scale=CODE_SCALE, size=(n_anchors + len(LEVELS) + len(PATTERNS), feature_dim))
    features = codes[a] + codes[n_anchors + s] + codes[n_anchors + len(LEVELS) + j] + rng.normal(size=(n, feature_dim))
    lat, lon = xyz_to_latlon(y)
    lon = np.where(lon >= 180, lon - 360, lon)
    split = rng.choice(np.array([0, 1, 2], np.uint8), size=n, p=[0.8, 0.1, 0.1])
    return dict(features=features.astype(np.float32), lat_deg=lat, lon_deg=lon, split=split,
                oracle_log_density=oracle, level=s, anchor=a, pattern=j, neighbours=neighbours, codes=codes)


def write_synthetic_cache(path: str | Path, anchor_lat_deg, anchor_lon_deg, *, n: int = DEFAULT_ROWS,
                          feature_dim: int = 64, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a synthetic cache at ``path`` and its oracle beside it (module docstring); returns ``path``."""
    path = Path(path)
    rows = synthetic_rows(anchor_lat_deg, anchor_lon_deg, n=n, feature_dim=feature_dim, seed=seed)
    ids = [f"synthetic{i:07d}" for i in range(n)]
    provenance = {"backbone": "synthetic-vmf-mixture", "seed": int(seed), "n_anchors": len(anchor_lat_deg),
                  "levels": dict(LEVELS), "patterns": [list(p) for p in PATTERNS]}
    with CacheWriter(path, feature_dim=feature_dim, countries=["XX"], provenance=provenance,
                     feature_dtype="float32", overwrite=overwrite) as writer:
        writer.write_block(features=rows["features"], ids=ids, lat_deg=rows["lat_deg"], lon_deg=rows["lon_deg"],
                           split=rows["split"], country=np.zeros(n, np.int16))
        writer.finalize()
    table = pa.table({"id": ids, "oracle_log_density": rows["oracle_log_density"],
                      "level": np.array(list(LEVELS))[rows["level"]]})
    tmp = oracle_path(path).with_suffix(".partial")
    pq.write_table(table, tmp)
    tmp.replace(oracle_path(path))
    return path
