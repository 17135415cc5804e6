"""Each head family's NLL minus the oracle's on the known-density cache (``geo data synthetic``).

README: "A benchmark where the true density is known".

Writes ``geo data synthetic``'s default cache (100,000 rows, 64 MP-16 anchors, d = 64) unless
``--cache`` names one, trains each head with ``fit_head(score=False)`` (selected on val NLL),
and prints its test-split NLL minus the oracle's, with ``geo.reports.oracle``'s bootstrap
interval (1000 replicates, seed 0), per localisability level, and the training time. The
density is the selected head's at each test row; fit-head's scoring is skipped because its
Monte Carlo calibration takes minutes (hours for the flow head) for 10,000 rows on a CPU.

Usage:
    python benchmarks/oracle_gap.py                                 # the CPU budget, every head family
    python benchmarks/oracle_gap.py --heads mvmf,flow --keep /tmp/oracle
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from geo.cache.store import FeatureCache
from geo.cache.synthetic import oracle_path, pick_anchors, write_synthetic_cache
from geo.geometry import latlon_to_xyz
from geo.training.config import FitConfig
from geo.training.fit import fit_head
from geo.training.runs import load_head

BUDGET = dict(epochs=10, batch_size=1024, lr=1e-2, select_by="nll_nats", precision="fp32", device="cpu")
# The flow head in BUDGET at its defaults; its val evaluations are ODE solves, hence one, at the end, best-of-1.
FLOW_BUDGET = dict(BUDGET, head="flow", flow_samples=1, eval_every=10**9)
HEADS = {
    "mvmf": dict(BUDGET, head="mvmf", n_cells=1024, kappa0=8.0),
    "deep-mvmf": dict(BUDGET, head="mvmf", n_cells=1024, kappa0=8.0, trunk_depth=2, trunk_width=256),
    "softmax": dict(BUDGET, head="softmax", n_cells=1024),
    "knn": dict(BUDGET, head="knn"),
    "vmf-mixture": dict(BUDGET, head="vmf-mixture"),
    "vmf": dict(BUDGET, head="vmf"),
    "regression": dict(BUDGET, head="regression"),
    "flow": FLOW_BUDGET,
}
LEVELS = ("city", "region", "continent")


def test_gaps(cache_path: Path, run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Per test row: oracle minus head log-density (nats), and the row's level."""
    table = pq.read_table(oracle_path(cache_path))
    oracle = table.column("oracle_log_density").to_numpy()
    level = np.array(table.column("level").to_pylist())
    head = load_head(run_dir).head
    with FeatureCache(cache_path) as cache:
        rows = cache.split_rows("test")
        y = torch.from_numpy(latlon_to_xyz(cache.lat_deg[rows], cache.lon_deg[rows])).float()
        x = torch.from_numpy(cache.load_features(rows)).float()
    with torch.no_grad():
        log_p = torch.cat([head.log_density_at(head(x[i:i + 1024]), y[i:i + 1024]).double()
                           for i in range(0, len(rows), 1024)]).numpy()
    return oracle[rows] - log_p, level[rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, help="A cache written by geo data synthetic (default: write one).")
    parser.add_argument("--heads", default=",".join(HEADS), help="Comma-separated, of: " + ", ".join(HEADS))
    parser.add_argument("--keep", type=Path, help="Keep the cache and runs here (default: a temporary folder).")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="oracle-gap-"))
    cache_path = args.cache
    if cache_path is None:
        from geo.pipeline.earth import load_locations

        lat, lon, _ = load_locations()
        cache_path = write_synthetic_cache(work / "synth.h5", *pick_anchors(lat, lon), overwrite=True)
    for name in args.heads.split(","):
        start = time.perf_counter()
        fit_head(cache_path, FitConfig(**HEADS[name]), work / name, overwrite=True, progress=False, score=False)
        fit_s = time.perf_counter() - start
        gap, level = test_gaps(cache_path, work / name)
        means = gap[np.random.default_rng(0).integers(len(gap), size=(1000, len(gap)))].mean(1)
        per_level = " ".join(f"{lv} {gap[level == lv].mean():+.2f}" for lv in LEVELS)
        print(f"{name:12s} NLL - oracle {gap.mean():+.3f} [{np.percentile(means, 2.5):+.3f}, "
              f"{np.percentile(means, 97.5):+.3f}]  {per_level}  (n = {len(gap)}, fit {fit_s:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
