"""Evaluating a head on one split of a feature cache, and re-evaluating a saved run.

``evaluate_split`` is the one evaluation loop: ``fit_head`` calls it on the
val split during training and on the test split at the end, and
``evaluate_run`` calls it on a saved run, so the three never drift apart.
The device and precision choices (``--device auto``, ``--precision auto``)
live here too, since training and evaluation must make them alike.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from geo.devices import resolve_device
from geo.errors import ConfigError
from geo.geometry import EARTH_RADIUS_KM, great_circle_km, latlon_to_xyz
from geo.metrics import AREA_LEVELS, summarize
from geo.training import reference, runs
from geo.training.config import TOPK

CALIBRATION_SAMPLES = 2500  # Monte Carlo samples per image: HPD levels to a standard error <= 0.01
CALIBRATION_SEED = 0  # the seed of those samples: an evaluation is reproducible

CountryFn = Callable[[np.ndarray, np.ndarray], Sequence[str]]
"""``(lat_deg [n], lon_deg [n]) -> ISO alpha-2 codes [n]`` (e.g. ``geo.pipeline.countries.country_codes``).
Passed in by the caller because ``geo.training`` never imports ``geo.pipeline``."""



@contextmanager
def eval_mode(module: torch.nn.Module):
    """``module.eval()`` inside the block, its previous mode restored after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def features_to_tensor(features: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Cached float16 features ``[b, d]`` as a ``dtype`` tensor on ``device``."""
    t = torch.from_numpy(np.ascontiguousarray(features))
    if device.type == "cpu":
        return t.to(dtype)  # half arithmetic on CPU is slow: convert once here
    return t.to(device, non_blocking=True).to(dtype)


def feature_dtype(precision: str) -> torch.dtype:
    """The dtype features are fed in: bf16 when the W x product runs in bf16."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


@torch.no_grad()
def calibrate_on_split(head, cache, split: str, *, device: torch.device, feature_dtype: torch.dtype,
                       batch_size: int) -> list[torch.Tensor]:
    """``head.calibrate(outputs, target_xyz)`` with the head's outputs on every row of ``split`` (eval mode).

    For heads that declare ``needs_calibration`` (their outputs are small, e.g. ``[n, 3]``).
    Returns the outputs per batch (``iter_batches(split, batch_size, shuffle=False)``'s), which
    ``evaluate_split`` can reuse: calibration fits on the outputs, so it cannot change them, and a
    retrieval head's outputs cost a pass over its gallery.
    """
    outputs, targets = [], []
    with eval_mode(head):
        for rows, features in cache.iter_batches(split, batch_size, shuffle=False):
            outputs.append(head(features_to_tensor(features, device, feature_dtype)))
            targets.append(torch.from_numpy(latlon_to_xyz(cache.lat_deg[rows], cache.lon_deg[rows])))
    head.calibrate(torch.cat(outputs), torch.cat(targets).to(device))
    return outputs


@torch.no_grad()
def evaluate_split(
    head,
    cache,
    split: str,
    *,
    predict: str,
    device: torch.device,
    feature_dtype: torch.dtype,
    batch_size: int,
    n_bootstrap: int = 0,
    topk: int = 0,
    country_fn: CountryFn | None = None,
    progress: bool = False,
    calibration: bool | None = None,
    calibration_samples: int = CALIBRATION_SAMPLES,
    outputs: list[torch.Tensor] | None = None,
    subset_rows: np.ndarray | None = None,
) -> tuple[dict, dict | None]:
    """Metrics of ``head`` on ``split`` of ``cache`` and, if ``topk``, per-row predictions.

    Args:
        head: a ``geo.heads.Head`` on ``device``.
        cache: an open ``geo.cache.store.FeatureCache``.
        split: "train", "val" or "test".
        predict: the prediction mode passed to ``head.predict`` (k = 1).
        batch_size: rows per forward pass (bounds the ``[b, c]`` memory).
        n_bootstrap: bootstrap replicates for the intervals (0 = none, for speed).
        topk: k of the top-k columns of the returned predictions; 0 = return no predictions.
        country_fn: maps predicted lat/lon to country codes; None = no country accuracy.
        calibration: compute each row's HPD level and credible-region areas (heads with a
            density; ``head.calibration``, seeded with ``CALIBRATION_SEED``: reproducible for
            the same rows in the same order); None = when ``topk`` (final scoring, not the
            val evaluations during training).
        calibration_samples: Monte Carlo samples per row where no closed form exists.
        outputs: the head's outputs per batch of ``iter_batches(split, batch_size, shuffle=False)``,
            already computed (``calibrate_on_split``'s); None = compute them here.
        subset_rows: sorted file rows of a subset of ``split`` to score instead of the whole split
            (``Head.val_rows_cap``); ``outputs`` must then be None.
    Returns:
        ``(metrics, predictions)``: ``metrics`` from ``geo.metrics.summarize``
        (+ ``"split"``, ``"predict"``); ``predictions`` a dict of numpy arrays with
        the columns of ``predictions.parquet`` (None when ``topk == 0``).
    """
    if subset_rows is not None and outputs is not None:
        raise ValueError("evaluate_split: outputs are per batch of the whole split; give subset_rows or outputs")
    rows_all = cache.split_rows(split) if subset_rows is None else np.asarray(subset_rows, dtype=np.int64)
    n = len(rows_all)
    k = min(topk, head.max_k) if topk else 0
    pred_lat = np.empty(n)
    pred_lon = np.empty(n)
    log_density = np.empty(n)
    has_log_density = True
    calibrate = bool(topk) if calibration is None else bool(calibration)
    calibrate = calibrate and bool(getattr(head, "has_density", False))
    hpd_level = np.empty(n)
    area_sr = np.empty((n, len(AREA_LEVELS)))
    generator = torch.Generator().manual_seed(CALIBRATION_SEED)
    topk_lat = np.empty((n, k))
    topk_lon = np.empty((n, k))
    topk_prob = np.empty((n, k))
    row_order = np.empty(n, np.int64)
    # Topk locations come from the components / cells themselves; "mode" is a
    # single point per row, so its top-k falls back to the arg-max ranking.
    topk_mode = "argmax" if predict == "mode" else predict
    done = 0
    with eval_mode(head):
        batches = cache.iter_batches(split, batch_size, shuffle=False, rows=subset_rows)
        bar = tqdm(total=n, desc=f"eval {split}", disable=not progress, leave=False, unit="row", unit_scale=True)
        for i, (rows, features) in enumerate(batches):
            b = len(rows)
            sl = slice(done, done + b)
            row_order[sl] = rows
            logits = head(features_to_tensor(features, device, feature_dtype)) if outputs is None else outputs[i]
            lat, lon = head.predict(logits, k=1, mode=predict)
            pred_lat[sl] = lat[:, 0].double().cpu().numpy()
            pred_lon[sl] = lon[:, 0].double().cpu().numpy()
            if has_log_density:
                y = torch.from_numpy(latlon_to_xyz(cache.lat_deg[rows], cache.lon_deg[rows]).astype(np.float32))
                try:
                    log_density[sl] = head.log_density_at(logits, y.to(device)).double().cpu().numpy()
                except NotImplementedError:
                    has_log_density = False
            if calibrate:
                y64 = torch.from_numpy(latlon_to_xyz(cache.lat_deg[rows], cache.lon_deg[rows]))
                try:
                    hpd, areas = head.calibration(logits, y64, levels=[a / 100 for a in AREA_LEVELS],
                                                  n_samples=calibration_samples, generator=generator)
                    hpd_level[sl] = hpd.numpy()
                    area_sr[sl] = areas.numpy()
                except NotImplementedError:  # a density it cannot sample from: no calibration columns
                    calibrate = False
            if k:
                probs, _ = head.topk(logits, k)
                tlat, tlon = head.predict(logits, k=k, mode=topk_mode)
                topk_prob[sl] = probs.double().cpu().numpy()
                topk_lat[sl] = tlat.double().cpu().numpy()
                topk_lon[sl] = tlon.double().cpu().numpy()
            done += b
            bar.update(b)
        bar.close()
    if done != n or not np.array_equal(np.sort(row_order), rows_all):
        raise RuntimeError(f"evaluation of split {split!r} covered {done} of {n} rows")  # a cache bug, not user input
    lat_true, lon_true = cache.lat_deg[row_order], cache.lon_deg[row_order]
    dist_km = great_circle_km(lat_true, lon_true, pred_lat, pred_lon)
    country = {}
    if country_fn is not None:
        true_codes = np.asarray(cache.countries, dtype=object)[cache.country[row_order]]
        country = dict(pred_country=np.asarray(country_fn(pred_lat, pred_lon), dtype=object), true_country=true_codes)
    area_km2 = area_sr * EARTH_RADIUS_KM ** 2 if calibrate else None
    metrics = summarize(
        dist_km, log_density=log_density if has_log_density else None, n_bootstrap=n_bootstrap,
        hpd_level=hpd_level if calibrate else None, area_km2=area_km2, **country
    )
    metrics = {"split": split, "predict": predict, **metrics}
    if not k:
        return metrics, None
    predictions = dict(
        ids=cache.ids[row_order], lat_deg=lat_true, lon_deg=lon_true, pred_lat_deg=pred_lat, pred_lon_deg=pred_lon,
        dist_km=dist_km, topk_lat_deg=topk_lat, topk_lon_deg=topk_lon, topk_prob=topk_prob,
        log_density=log_density if has_log_density else None,
        hpd_level=hpd_level if calibrate else None, area_km2=area_km2,
    )
    return metrics, predictions


def evaluation_name(cache_path: str | Path, split: str) -> str:
    """The default ``--name`` of an evaluation: the cache's stem, plus ``-SPLIT`` for a split other than test."""
    stem = Path(cache_path).stem
    return stem if split == "test" else f"{stem}-{split}"


def evaluate_run(
    run_dir: str | Path,
    *,
    cache_path: str | Path | None = None,
    split: str = "test",
    name: str | None = None,
    predict: str | None = None,
    allow_other_provenance: bool = False,
    country_fn: CountryFn | None = None,
    device: str | None = None,
    n_bootstrap: int = 1000,
    progress: bool = False,
) -> dict:
    """Evaluate a saved run's selected model into ``RUN/eval/NAME/`` (metrics.json, predictions.parquet).

    The run's own files (config, checkpoint, its test metrics and predictions) are never
    written: each evaluation gets a folder of its own, so a report shows the run's test
    results and every other test set apart.

    Args:
        run_dir: a run directory written by ``fit_head``.
        cache_path: the cache to evaluate on; default the run's own cache.
        split: the split of that cache to evaluate.
        name: the evaluation's folder name (the test set's name in reports); default
            ``evaluation_name(cache_path, split)`` (the cache's stem).
        predict: prediction mode; default the run's.
        allow_other_provenance: evaluate on a cache whose features were made otherwise
            (backbone, checkpoint, transform, image size, precision) than the training
            cache's. Refused by default: such features are not what the head was trained
            on. Which manifest was read does not count (``geo extract --like``).
        device: "auto" (default), "cpu", "cuda" ...
    Returns:
        The metrics dict written to ``metrics.json`` (with ``"eval_dir"``, ``"test_set"``).
    """
    from geo.cache.store import FeatureCache  # lazy: keeps `geo --help` fast

    run_dir = Path(run_dir)
    dev = resolve_device(device or "auto")
    loaded = runs.load_head(run_dir, dev)
    config = loaded.config
    cache_path = Path(cache_path) if cache_path is not None else Path(config["cache_path"])
    name = name if name is not None else evaluation_name(cache_path, split)
    out_dir = runs.eval_dir(run_dir, name)
    with FeatureCache(cache_path) as cache:
        if cache.feature_dim != config["cache_feature_dim"]:
            raise ConfigError(
                f"{cache_path}: feature_dim {cache.feature_dim}, but run {run_dir} was trained on "
                f"feature_dim {config['cache_feature_dim']}"
            )
        diffs = runs.feature_provenance_differences(config["cache_provenance"], runs.json_safe(cache.provenance))
        if diffs and not allow_other_provenance:
            raise ConfigError(
                f"{cache_path}: provenance differs from the cache run {run_dir} was trained on "
                f"({'; '.join(diffs)}); pass --allow-other-provenance to evaluate anyway"
            )
        if len(cache.split_rows(split)) == 0:
            raise ConfigError(f"{cache_path}: no rows in split {split!r} "
                              f" ({cache.n_rows} rows); choose another --split")
        train_lat_lon = _training_locations(config["cache_path"], cache_path, cache)
        config = dict(config, predict=loaded.head.check_predict(predict or config["predict"]),
                      cache_path=str(cache_path))
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics = score_and_write(loaded.head, cache, split, config, out_dir, device=dev, n_bootstrap=n_bootstrap,
                                  country_fn=country_fn, progress=progress, selected_step=loaded.selected_step,
                                  train_lat_lon=train_lat_lon, partition=loaded.partition,
                                  test_set=name, run=str(run_dir), other_provenance=bool(diffs))
        return dict(metrics, eval_dir=str(out_dir))


def _training_locations(training_cache: str | Path, cache_path: Path, cache) -> tuple | None:
    """The train split's (lat_deg, lon_deg) of the cache a run was trained on (``cache`` itself when it is
    that file); None when that cache is no longer readable (the evaluation then records no distances)."""
    from geo.cache.store import FeatureCache
    from geo.errors import CacheError

    try:
        if Path(training_cache).resolve() == Path(cache_path).resolve():
            return reference.train_locations(cache)
        with FeatureCache(training_cache, validate=False) as train_cache:
            return reference.train_locations(train_cache)
    except (OSError, CacheError):
        return None


def score_and_write(head, cache, split: str, config: dict, run_dir: Path, *, device: torch.device,
                    n_bootstrap: int = 1000, country_fn: CountryFn | None = None, progress: bool = False,
                    train_lat_lon: tuple | None = None, partition=None, **extra) -> dict:
    """Final scoring of a selected head: ``metrics.json`` and ``predictions.parquet`` in ``run_dir``.

    ``train_lat_lon`` (the training cache's train split locations) and ``partition`` (the run's, for
    heads over cells) add what the test set can show (``geo.training.reference``: the distance to
    the nearest train image, the densest-cell baseline). ``extra`` items are added to the metrics
    (cache path, selected step ...). Returns the metrics.
    """
    metrics, preds = evaluate_split(
        head, cache, split, predict=config["predict"], device=device,
        feature_dtype=feature_dtype(config["precision"]), batch_size=config["eval_batch_size"],
        n_bootstrap=n_bootstrap, topk=config.get("topk", TOPK), country_fn=country_fn, progress=progress,
    )
    rows = cache.split_rows(split)
    metrics = {**metrics, "cache_path": config["cache_path"], "cache_n_skipped": len(cache.skipped),
               **reference.reference_metrics(cache.lat_deg[rows], cache.lon_deg[rows], train_lat_lon=train_lat_lon,
                                             partition=partition), **extra}
    runs.write_predictions(Path(run_dir) / runs.PREDICTIONS_FILE, **preds)
    runs.write_json(Path(run_dir) / runs.METRICS_FILE, metrics)
    return metrics


def format_metrics(metrics: dict) -> str:
    """A plain-text table of a metrics dict: accuracies in %, km, GeoScore, country acc, NLL (with 95 % CIs)."""
    ci = metrics.get("ci", {})
    rows = []
    for key, label in [("acc@1km", "acc@1 km"), ("acc@25km", "acc@25 km"), ("acc@200km", "acc@200 km"),
                       ("acc@750km", "acc@750 km"), ("acc@2500km", "acc@2500 km"), ("country_acc", "country acc")]:
        if key in metrics:
            lo, hi = ci.get(key, (None, None))
            interval = f"  [{100 * lo:5.1f}, {100 * hi:5.1f}]" if lo is not None else ""
            rows.append(f"{label:<14}{100 * metrics[key]:8.1f} %{interval}")
    for key, label, unit in [("median_km", "median", " km"), ("mean_km", "mean", " km"), ("geoscore", "GeoScore", ""),
                             ("nll_nats", "NLL", " nats/sr")]:
        if key in metrics and metrics[key] is not None:
            lo, hi = ci.get(key, (None, None))
            interval = f"  [{lo:.1f}, {hi:.1f}]" if lo is not None else ""
            rows.append(f"{label:<14}{metrics[key]:10.1f}{unit}{interval}")
    for key, label in [("coverage@50", "coverage@50"), ("coverage@80", "coverage@80"), ("coverage@95", "coverage@95"),
                       ("calibration_error", "calib. error")]:
        if metrics.get(key) is not None:
            lo, hi = ci.get(key, (None, None))
            interval = f"  [{100 * lo:5.1f}, {100 * hi:5.1f}]" if lo is not None else ""
            rows.append(f"{label:<14}{100 * metrics[key]:8.1f} %{interval}")
    for key, label in [("area50_km2", "50 % region"), ("area95_km2", "95 % region")]:
        if metrics.get(key) is not None:
            lo, hi = ci.get(key, (None, None))
            interval = f"  [{lo:.3g}, {hi:.3g}]" if lo is not None else ""
            rows.append(f"{label:<14}{metrics[key]:10.3g} km² (median){interval}")
    head = f"{metrics.get('split', '?')} split, n = {metrics.get('n', '?')}, predict = {metrics.get('predict', '?')}"
    return "\n".join([head, *rows])
