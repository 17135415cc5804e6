"""geo.training.subsets and its use: nested train subsets (--train-fraction), checked by brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from geo.cache.store import FeatureCache
from geo.errors import CacheError, ConfigError
from geo.training.subsets import check_fraction, subset_size, train_subset
from support.caches import make_location_cache

FRACTIONS = (0.01, 0.1, 0.25, 0.3, 1 / 3, 0.5, 0.7, 0.99, 1.0)


@pytest.mark.parametrize("n", [1, 2, 7, 10, 100, 1001])
def test_subsets_of_one_seed_are_nested_and_of_the_stated_size(n):
    rng = np.random.default_rng(n)
    train = np.sort(rng.choice(10 * n, size=n, replace=False)).astype(np.int64)  # sorted rows with gaps
    for seed in range(5):
        subsets = {f: train_subset(train, f, seed) for f in FRACTIONS}
        for f, rows in subsets.items():
            assert abs(rows.size - f * n) <= 0.5 or (rows.size == 1 and f * n < 1)  # the nearest count, >= 1
            assert rows.size == subset_size(n, f)
            assert np.all(np.diff(rows) > 0) and set(rows.tolist()) <= set(train.tolist())
        for a, b in itertools.combinations(FRACTIONS, 2):  # every pair, a < b
            assert set(subsets[a].tolist()) <= set(subsets[b].tolist()), (n, seed, a, b)
        assert subsets[1.0] is train or np.array_equal(subsets[1.0], train)


def test_the_subset_is_a_uniform_random_draw_that_depends_on_the_seed():
    train = np.arange(40, dtype=np.int64)
    counts = np.zeros(40)
    for seed in range(2000):
        counts[train_subset(train, 0.25, seed)] += 1
    # every row is drawn in about a quarter of the seeds: chi-square against the uniform, 39 dof
    assert stats.chisquare(counts).pvalue > 1e-3
    assert np.all(np.abs(counts / 2000 - 0.25) < 0.06)
    assert not np.array_equal(train_subset(train, 0.25, 0), train_subset(train, 0.25, 1))
    assert np.array_equal(train_subset(train, 0.25, 3), train_subset(train, 0.25, 3))


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan"), "x", None])
def test_a_fraction_outside_zero_one_is_refused_naming_the_option(bad):
    with pytest.raises(ConfigError, match="--train-fraction must be"):
        check_fraction(bad)
    with pytest.raises(ConfigError, match="--train-fraction"):
        train_subset(np.arange(5), bad, 0)


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory):
    return make_location_cache(tmp_path_factory.mktemp("cache") / "loc.h5", n=600)


@pytest.mark.parametrize("streamed", [False, True])
def test_iter_batches_over_a_subset_serves_exactly_its_rows_once(cache_path, streamed):
    budget = 1 if streamed else None  # 1 byte: every split is streamed in blocks
    with FeatureCache(cache_path, memory_budget_bytes=budget) as cache:
        assert cache.fits_in_memory("train") is not streamed
        train = cache.split_rows("train")
        subset = train_subset(train, 0.3, seed=4)
        for epoch in range(2):
            batches = list(cache.iter_batches("train", 32, shuffle=True, seed=4, epoch=epoch, rows=subset))
            rows = np.concatenate([r for r, _ in batches])
            assert np.array_equal(np.sort(rows), subset)  # each subset row once, nothing else
            for r, x in batches:
                assert np.array_equal(x, cache.load_features(r))
        # the whole split's rows give the very batches of the whole split
        whole = list(cache.iter_batches("train", 32, shuffle=True, seed=4, epoch=1))
        given = list(cache.iter_batches("train", 32, shuffle=True, seed=4, epoch=1, rows=train))
        assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(whole, given))
        val = cache.split_rows("val")
        for bad in (val[:3], subset[::-1], np.zeros(0, np.int64), np.append(subset, subset[-1])):
            with pytest.raises(CacheError, match="train"):
                next(cache.iter_batches("train", 32, shuffle=False, rows=bad))


def test_a_killed_run_on_a_fraction_resumes_like_an_uninterrupted_one(cache_path, tmp_path):
    import json

    import torch

    from geo.training.config import FitConfig
    from geo.training.fit import fit_head

    config = FitConfig(head="softmax", n_cells=16, batch_size=64, epochs=2, lr=5e-2, precision="fp32", device="cpu",
                       eval_every=2, train_fraction=0.5, seed=3)
    whole = fit_head(cache_path, config, tmp_path / "whole", progress=False)

    def kill_at_step_5(step, loss):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_head(cache_path, config, tmp_path / "killed", progress=False, callback=kill_at_step_5)
    resumed = fit_head(cache_path, config, tmp_path / "killed", progress=False)
    strip = lambda m: {k: v for k, v in m.items() if not k.endswith("elapsed_s")}  # noqa: E731
    assert strip(resumed) == strip(whole)
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("whole", "killed"))
    for key, value in a["head_state"].items():
        assert torch.equal(value, b["head_state"][key]), key
    logs = [[strip(json.loads(line)) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("whole", "killed")]
    recorded = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert recorded["n_train"] == round(0.5 * recorded["n_train_split"])
    assert logs[0] == logs[1] and len(logs[0]) == recorded["total_steps"] // 2  # an evaluation every 2 steps
