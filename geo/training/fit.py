"""``fit_head``: train one output head on a feature cache, select it on val, score it on test.

``fit_head`` is one ``HeadTrainer`` (geo/training/trainer.py) driven by
``train_together``, the loop that ``geo sweep`` drives with many trainers at
once. What it does: build the partition from the train split's locations
(for heads over cells), create the head, AdamW with linear warm-up and cosine
decay, a pass over ``cache.iter_batches("train")`` per epoch (over the run's
nested random subset with ``train_fraction`` < 1, ``geo.training.subsets``;
the partition then comes from the subset's locations), an evaluation on
the val split every ``eval_every`` steps (a line in ``metrics.jsonl`` and a
checkpoint each time), and at the end the selected (best-on-val) model is
scored on the test split (``metrics.json``, ``predictions.parquet``). A run
directory that holds a checkpoint of the same configuration is resumed,
bit-identically: the checkpoint holds the step, the epoch and the position in
it, the optimizer moments, the RNG state and the best model so far; the data
order of each epoch is a function of (seed, epoch) alone. The options and
their resolution are ``geo.training.config``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from geo.cache.store import FeatureCache
from geo.errors import ConfigError
from geo.heads import head_class
from geo.sphere.partition import Partition
from geo.training import runs
from geo.training.config import FitConfig, few_steps_warning, implied_by_older_runs, resolve_config
from geo.training.evaluate import CountryFn
from geo.training.trainer import HeadTrainer, split_rows, train_rows, train_together


def fit_head(
    cache_path: str | Path,
    config: FitConfig,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    country_fn: CountryFn | None = None,
    callback: Callable[[int, float], None] | None = None,
    warn: Callable[[str], None] | None = None,
    score: bool = True,
) -> dict:
    """Train ``config.head`` on the train split of the cache at ``cache_path``; write the run to ``out_dir``.

    Args:
        cache_path: a ``geo-feature-cache/1`` file with train and val splits (test optional).
        config: the options (see ``FitConfig``); resolved values go to ``config.json``.
        out_dir: the run directory. Resumed when it holds a checkpoint of the same
            configuration; a different configuration raises ``ConfigError``
            (listing the differing keys) unless ``overwrite``.
        country_fn: maps predicted (lat_deg, lon_deg) to ISO codes for the final
            country accuracy (``geo.pipeline.countries.country_codes``); None = none.
        callback: called as ``callback(step, loss)`` after every step (tests use it
            to interrupt a run).
        warn: called with a message when the options look unwise but not impossible
            (too few optimizer steps); None = ``warnings.warn``.
        score: False = train and select only: the checkpoint holds the selected weights
            (``runs.load_head``), but no test scoring, metrics.json or predictions.parquet
            (scoring calibrates every test row by Monte Carlo: minutes for 10,000 rows at c = 1024).
    Returns:
        The final metrics of the selected model on the test split (on val when
        the cache has no test split), as written to ``metrics.json``; with ``score=False``
        the selected model's val metrics.
    """
    out_dir = Path(out_dir)
    with FeatureCache(cache_path) as cache:
        rows_by_split = split_rows(cache)
        cfg = resolve_config(config, cache, Path(cache_path), len(rows_by_split["train"]), len(rows_by_split["val"]))
        message = few_steps_warning(cfg)
        if message:
            (warn or warnings.warn)(message)
        # The partition before the run directory: a --n-cells the locations cannot give leaves nothing behind.
        partition = None
        if head_class(cfg["head"]).uses_partition:
            train = train_rows(cache, cfg)  # the rows this run trains on (its --train-fraction)
            try:
                partition = Partition.build(cache.lat_deg[train], cache.lon_deg[train], cfg["n_cells"])
            except ConfigError as err:
                raise ConfigError(f"--n-cells {cfg['n_cells']}: {err}") from None
        resume = runs.check_run_dir(out_dir, cfg, overwrite=overwrite, implied=implied_by_older_runs(cfg))
        trainer = HeadTrainer(cache, cfg, out_dir, resume=resume, partition=partition)
        bar = tqdm(total=cfg["total_steps"], initial=trainer.state["step"], disable=not progress, unit="step",
                   desc=f"fit {cfg['head']}", dynamic_ncols=True)
        train_together(cache, [trainer], bar=bar,
                       callback=None if callback is None else lambda t, step, loss: callback(step, loss))
        bar.close()
        if not score:
            return dict(trainer.state["best"]["metrics"] or {})
        return trainer.finish(country_fn=country_fn, progress=progress)
