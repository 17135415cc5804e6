"""The knn head's gallery at scale: read from the run's cache (never copied), exact search streamed in blocks
under a memory bound and equal to brute force, a changed or missing cache refused, FAISS indexes (flat equal to
exact, IVF's recall measured against brute force and recorded), and a head with nothing to train evaluated once."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from geo.cache.store import FeatureCache
from geo.errors import CacheError, ConfigError
from geo.training import runs
from geo.training.config import FitConfig
from geo.training.evaluate import evaluate_run
from geo.training.fit import fit_head
from geo.training.gallery import gallery_rows
from geo.training.runs import load_head
from support.caches import make_location_cache

KNN = dict(head="knn", knn_k=8, precision="fp32", device="cpu", batch_size=256)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_location_cache(tmp_path_factory.mktemp("cache") / "loc.h5", n=2500, d=24)


def _brute_force(cache_path, split: str, k: int, train_fraction: float = 1.0, seed: int = 0):
    """float64 top-k by cosine of the split's rows over the train rows: (sims [n, k], file rows of neighbours)."""
    with FeatureCache(cache_path) as c:
        train = gallery_rows(c.split, train_fraction, seed)
        g = c.load_features(train).astype(np.float64)
        q = c.load_features(c.split_rows(split)).astype(np.float64)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    sims = q @ g.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), order, q


def _dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def test_streamed_exact_search_equals_brute_force_and_the_run_holds_no_gallery(cache, tmp_path):
    # --max-memory-mb 1: a few hundred gallery rows per block, so the ~1750-row gallery takes many blocks.
    fit_head(cache, FitConfig(**KNN, max_memory_mb=1), tmp_path / "knn", progress=False)
    loaded = load_head(tmp_path / "knn")
    head = loaded.head
    n_val = len(FeatureCache(cache).split_rows("val"))
    assert head.gallery.n_rows // head.gallery_block_rows(n_val) >= 4
    sims, order, q = _brute_force(cache, "val", 8)
    got_s, got_i = head.exact_topk(torch.from_numpy(q).float())
    np.testing.assert_array_equal(got_i.numpy(), order)
    np.testing.assert_allclose(got_s.numpy(), sims, atol=1e-5)
    # the run records which cache, which rows and its content hash; the checkpoint holds log kappa only
    config = runs.read_config(tmp_path / "knn")
    with FeatureCache(cache) as c:
        assert config["gallery"]["cache_sha256"] == c.content_sha256()
        assert config["gallery"]["n_rows"] == len(c.split_rows("train")) == head.gallery.n_rows
        gallery_bytes = len(c.split_rows("train")) * c.feature_dim * 2
    state = runs.load_checkpoint(tmp_path / "knn" / runs.CHECKPOINT_FILE)
    assert set(state["head_state"]) == {"log_kappa"} and set(state["best"]["head_state"]) == {"log_kappa"}
    assert os.path.getsize(tmp_path / "knn" / runs.CHECKPOINT_FILE) < 20_000
    assert _dir_bytes(tmp_path / "knn") < gallery_bytes  # predictions and metrics only: no copy of the gallery
    # nothing to train: evaluated once (one metrics.jsonl line), no epochs, no steps
    lines = runs.read_jsonl(tmp_path / "knn" / runs.METRICS_LOG_FILE)
    assert len(lines) == 1 and lines[0]["step"] == 0 and lines[0]["train_loss"] is None
    assert config["epochs"] == 0 and config["total_steps"] == 0
    # the final test predictions are brute force's nearest neighbour under --predict nn
    fit_head(cache, FitConfig(**KNN, predict="nn", max_memory_mb=1), tmp_path / "nn", progress=False)
    table = pq.read_table(tmp_path / "nn" / runs.PREDICTIONS_FILE).to_pydict()
    _, order_test, _ = _brute_force(cache, "test", 8)
    with FeatureCache(cache) as c:
        train = c.split_rows("train")
        lat, lon = c.lat_deg[train][order_test[:, 0]], c.lon_deg[train][order_test[:, 0]]
    np.testing.assert_allclose(table["pred_lat"], lat, atol=1e-9)
    np.testing.assert_allclose(np.cos(np.radians(np.array(table["pred_lon"]) - lon)), 1.0, atol=1e-12)


def test_train_fraction_gallery_is_the_subset(cache, tmp_path):
    fit_head(cache, FitConfig(**KNN, train_fraction=0.5), tmp_path / "half", progress=False)
    head = load_head(tmp_path / "half").head
    sims, order, q = _brute_force(cache, "val", 8, train_fraction=0.5)
    assert head.gallery.n_rows == runs.read_config(tmp_path / "half")["n_train"]
    np.testing.assert_array_equal(head.exact_topk(torch.from_numpy(q).float())[1].numpy(), order)


def test_a_changed_or_missing_cache_is_refused(tmp_path):
    path = make_location_cache(tmp_path / "c.h5", n=1200, d=16, seed=1)
    fit_head(path, FitConfig(**KNN), tmp_path / "run", progress=False)
    recorded = runs.read_config(tmp_path / "run")["gallery"]["cache_sha256"]
    path.unlink()
    make_location_cache(path, n=1200, d=16, seed=2)  # same path and shape, other content
    with FeatureCache(path) as c:
        now = c.content_sha256()
    assert now != recorded
    for use in (lambda: load_head(tmp_path / "run"), lambda: evaluate_run(tmp_path / "run", n_bootstrap=0)):
        with pytest.raises(CacheError) as err:
            use()
        assert str(path) in str(err.value) and recorded in str(err.value) and now in str(err.value)
    path.unlink()
    with pytest.raises(CacheError, match="missing"):
        load_head(tmp_path / "run")


def test_content_hash_without_commit_records_equals_the_recorded_one(tmp_path):
    import h5py

    from geo.cache.commits import content_sha256

    path = make_location_cache(tmp_path / "c.h5", n=500, d=8)
    with h5py.File(path, "r") as f:
        recorded = content_sha256(f)
    with h5py.File(path, "a") as f:  # a file with no commit records is hashed from its rows as stored
        f.attrs["blocks_committed"] = 0
    with h5py.File(path, "r") as f:
        assert content_sha256(f) == recorded


def test_faiss_flat_equals_exact_and_ivf_recall_is_measured(cache, tmp_path):
    import faiss  # noqa: F401  (a test extra: an import error fails the test, never skips it)

    exact = fit_head(cache, FitConfig(**KNN), tmp_path / "exact", progress=False)
    flat = fit_head(cache, FitConfig(**KNN, knn_index="flat"), tmp_path / "flat", progress=False)
    a = pq.read_table(tmp_path / "exact" / runs.PREDICTIONS_FILE).to_pydict()
    b = pq.read_table(tmp_path / "flat" / runs.PREDICTIONS_FILE).to_pydict()
    for key in ("pred_lat", "pred_lon", "topk_lat", "topk_lon"):
        np.testing.assert_allclose(np.array(b[key]), np.array(a[key]), atol=1e-6, err_msg=key)
    np.testing.assert_allclose(np.array(b["topk_prob"]), np.array(a["topk_prob"]), atol=1e-5)
    assert flat["knn_index"] == "flat" and flat["knn_recall@8"] == 1.0 and "knn_index" not in exact
    assert flat["knn_index_build_s"] >= 0 and os.path.exists(flat["knn_index_path"])
    assert os.path.dirname(flat["knn_index_path"]).endswith("loc.h5.knn")  # beside the cache, not in the run
    # IVF with one probed list: approximate; the recorded recall@8 is what brute force says it is
    ivf = fit_head(cache, FitConfig(**KNN, knn_index="ivf", knn_nprobe=1, knn_rerank=1), tmp_path / "ivf",
                   progress=False)
    head = load_head(tmp_path / "ivf").head
    _, order, q = _brute_force(cache, "val", 8)
    approx = head.index_topk(torch.from_numpy(q).float())[1].numpy()
    recall = np.mean([len(set(a_) & set(e)) / 8 for a_, e in zip(approx, order)])
    assert ivf["knn_recall@8"] == pytest.approx(recall, abs=1e-12)
    assert 0 < recall < 1 and ivf["knn_nprobe"] == 1
    # built once: a second run over the same gallery reuses the index file
    mtime = os.path.getmtime(ivf["knn_index_path"])
    again = fit_head(cache, FitConfig(**KNN, knn_index="ivf", knn_nprobe=4, knn_rerank=1), tmp_path / "ivf4",
                     progress=False)
    assert again["knn_index_path"] == ivf["knn_index_path"] and os.path.getmtime(ivf["knn_index_path"]) == mtime
    assert again["knn_recall@8"] >= recall
    # the report shows the index, its build time and its recall
    from geo.reports.runs import read_run
    from geo.reports.tables import knn_index_note

    note = knn_index_note([read_run(tmp_path / "ivf")])
    assert "ivf index" in note and "recall@8" in note and f"{recall:.3f}" in note


def test_hnsw_index_recall_is_what_brute_force_says_and_grows_with_its_search_width(cache, tmp_path):
    import faiss  # noqa: F401  (a test extra: an import error fails the test, never skips it)

    _, order, q = _brute_force(cache, "val", 8)
    recalls = []
    for nprobe in (1, 16):  # efSearch = max(4 nprobe, 2 k): 16, then 64
        out = fit_head(cache, FitConfig(**KNN, knn_index="hnsw", knn_nprobe=nprobe, knn_rerank=1),
                       tmp_path / f"hnsw{nprobe}", progress=False)
        approx = load_head(tmp_path / f"hnsw{nprobe}").head.index_topk(torch.from_numpy(q).float())[1].numpy()
        recall = np.mean([len(set(a_) & set(e)) / 8 for a_, e in zip(approx, order)])
        assert out["knn_index"] == "hnsw" and out["knn_nprobe"] == nprobe
        assert out["knn_recall@8"] == pytest.approx(recall, abs=1e-12)
        assert os.path.basename(out["knn_index_path"]).startswith("hnsw-")
        recalls.append(recall)
    assert 0.5 < recalls[0] <= recalls[1] < 1  # 8-bit codes: most neighbours (0.94 here), never fewer with a wider search


@pytest.mark.slow
def test_fit_knn_and_evaluate_stream_under_a_budget_far_below_the_cache(tmp_path, monkeypatch):
    import geo.cache.reader as reader

    path = make_location_cache(tmp_path / "big.h5", n=20_000, d=64)
    size = os.path.getsize(path)
    monkeypatch.setattr(reader, "default_memory_budget_bytes", lambda: size // 50)  # every split is streamed
    with FeatureCache(path) as c:
        assert not c.fits_in_memory("train") and not c.fits_in_memory("val")
    mvmf = fit_head(path, FitConfig(head="mvmf", n_cells=64, epochs=1, batch_size=512, precision="fp32",
                                    device="cpu"), tmp_path / "mvmf", progress=False)
    knn = fit_head(path, FitConfig(**KNN, max_memory_mb=1), tmp_path / "knn", progress=False)
    head = load_head(tmp_path / "knn").head
    assert head.gallery.n_rows // head.gallery_block_rows(16384) >= 10  # the gallery in >= 10 blocks
    for run, metrics in (("mvmf", mvmf), ("knn", knn)):
        evaluated = evaluate_run(tmp_path / run, n_bootstrap=0)
        assert evaluated["acc@750km"] == pytest.approx(metrics["acc@750km"])
    assert knn["acc@750km"] > 0.8  # (one epoch of ~30 steps teaches the mvmf little: only its streaming is checked)
    sims, order, q = _brute_force(path, "val", 8)
    found = head.exact_topk(torch.from_numpy(q).float())[1].numpy()
    # float16 features repeat: neighbours tied in float32 may swap; each one found is as similar as brute force's
    with FeatureCache(path) as c:
        g = c.load_features(c.split_rows("train")).astype(np.float64)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    np.testing.assert_allclose(np.einsum("qd,qkd->qk", q, g[found]), sims, atol=1e-6)
    assert np.mean(found == order) > 0.99


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_reranked_candidates_carry_exact_similarities_and_never_lower_recall(cache, tmp_path, kind):
    import faiss  # noqa: F401  (a test extra: an import error fails the test, never skips it)

    exact_sims, order, q = _brute_force(cache, "val", 8)
    with FeatureCache(cache) as c:
        g = c.load_features(gallery_rows(c.split, 1.0, 0)).astype(np.float64)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    recalls = {}
    for rerank in (1, 4):
        out = fit_head(cache, FitConfig(**KNN, knn_index=kind, knn_nprobe=1, knn_rerank=rerank),
                       tmp_path / f"{kind}{rerank}", progress=False)
        sims, found = load_head(tmp_path / f"{kind}{rerank}").head.index_topk(torch.from_numpy(q).float())
        sims, found = sims.numpy(), found.numpy()
        recalls[rerank] = np.mean([len(set(a_) & set(e)) / 8 for a_, e in zip(found, order)])
        assert out["knn_recall@8"] == pytest.approx(recalls[rerank], abs=1e-12) and out["knn_rerank"] == rerank
        truth = np.take_along_axis(q @ g.T, found, 1)  # float64 cosine of each returned row
        if rerank > 1:  # exact similarities, most similar first
            np.testing.assert_allclose(sims, truth, atol=2e-6)
            assert (np.diff(sims, axis=1) <= 0).all()
        else:  # from the 8-bit codes: off by more than float32 rounding
            assert np.abs(sims - truth).max() > 1e-4
    assert recalls[1] < recalls[4]  # the near-duplicates the codes misorder are put back in order
    # a run made before re-ranking existed (no knn_rerank in config.json) was not re-ranked: it is the same run
    # as --knn-rerank 1, and the default (4) is another configuration
    path = tmp_path / f"{kind}1" / "config.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "knn_rerank"}))
    fit_head(cache, FitConfig(**KNN, knn_index=kind, knn_nprobe=1, knn_rerank=1), tmp_path / f"{kind}1",
             progress=False)
    with pytest.raises(ConfigError, match=r"knn_rerank: 1 -> 4"):
        fit_head(cache, FitConfig(**KNN, knn_index=kind, knn_nprobe=1), tmp_path / f"{kind}1", progress=False)
