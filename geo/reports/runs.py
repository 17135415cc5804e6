"""Read run directories (format ``geo-run/1``) for reports.

This module is the one place that knows the key names of a run directory's
``config.json``, ``metrics.jsonl`` and ``metrics.json``; everything else in
``geo.reports`` works on :class:`Run`. Reading is tolerant: an optional key
that is missing becomes ``None``; a directory that cannot be used (missing or
corrupt required file, unknown format) becomes a :class:`SkippedRun` with the
reason, so one bad directory never stops a report.

A run directory holds (written by ``geo.training``; the format is ``geo.training.runs``)::

    config.json          every resolved option, "format": "geo-run/1", cache path + provenance
    metrics.jsonl        one JSON line per evaluation: step, epoch, train_loss, lr, val metrics
    metrics.json         final test metrics (geo.metrics.summarize) + "split", "predict"
    checkpoint.pt        head state, partition state, config (for maps)
    predictions.parquet  per test image: id, lat, lon, pred_lat, pred_lon, dist_km, top-k, log_density
    eval/NAME/           metrics.json + predictions.parquet of `geo evaluate` on test set NAME
                         (read by geo.reports.testsets)
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from geo.errors import ConfigError, GeoError
from geo.heads import head_class
from geo.training.runs import (CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, METRICS_LOG_FILE,
                            PREDICTIONS_FILE, RUN_FORMAT, read_jsonl)
from geo.metrics import (AREA_LEVELS, COVERAGE_LEVELS, DISTANCE_SCALES_KM, accuracy_key, area_key,
                         coverage_key)
from geo.training.reference import DENSEST_CELL_KEY, TRAIN_DISTANCE_KEY

SCALES_KM = DISTANCE_SCALES_KM
ACC_KEYS = tuple(accuracy_key(s) for s in SCALES_KM)
# Metric keys the reports show, in table order, and whether larger is better.
# Calibration and sharpness (heads with a density; geo.metrics): coverage of the 50/80/95 % credible
# regions, the mean |coverage - level| (lower is better) and the median areas of the 50 % and 95 % regions.
COVERAGE_KEYS = tuple(coverage_key(level) for level in COVERAGE_LEVELS)
AREA_KEYS = tuple(area_key(level) for level in AREA_LEVELS)
CALIBRATION_KEYS = COVERAGE_KEYS + ("calibration_error",) + AREA_KEYS
METRIC_KEYS = ACC_KEYS + ("median_km", "mean_km", "geoscore", "country_acc", "nll_nats") + CALIBRATION_KEYS
# Coverages are best near their level, areas only beside calibration: neither is "higher is better"; the
# table marks no best value for them (None).
HIGHER_IS_BETTER = {**{k: True for k in ACC_KEYS}, "median_km": False, "mean_km": False,
                    "geoscore": True, "country_acc": True, "nll_nats": False, "calibration_error": False,
                    **{k: None for k in COVERAGE_KEYS + AREA_KEYS}}
# Validation metric that picks one run among duplicates (never the test split); fit-head's default rule.
SELECT_KEY = "geoscore"
# The two kinds of run (``Run.features``): a head on a frozen backbone's cached features, or `geo finetune`'s.
FROZEN, END_TO_END = "frozen", "end-to-end"

RUN_FILES = (CONFIG_FILE, METRICS_LOG_FILE, METRICS_FILE, CHECKPOINT_FILE, PREDICTIONS_FILE)

_STEP_FIELDS = ("step", "epoch", "train_loss", "lr", "elapsed_s")


class ReportError(GeoError):
    """Runs that cannot be put side by side (different caches), or nothing to report."""


@dataclass
class SkippedRun:
    """A directory the report could not use, and why."""

    path: Path
    reason: str


@dataclass
class Run:
    """One finished run, with the fields reports need; optional ones may be ``None``.

    Metric values are as in ``geo.metrics.summarize``: accuracies are fractions 0..1,
    distances km, NLL nats per steradian. ``test_ci`` maps a metric key to (lo, hi).
    ``history`` holds one dict per evaluation: step, epoch, train_loss, lr, elapsed_s, val (dict).
    """

    path: Path
    name: str
    config: dict
    head: str
    n_cells: int | None
    kappa0: float | None
    predict: str | None
    seed: int | None
    lr: float | None
    cache_path: str | None
    cache_id: str | None
    test: dict
    test_ci: dict
    history: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    split: str | None = None  # the split metrics.json was computed on ("test" normally)
    cache_label: str | None = None  # set by check_caches when mixed caches are allowed
    train_fraction: float = 1.0  # the fraction of the train split the run trained on (--train-fraction)
    n_train: int | None = None  # train rows the run trained on (config.json's n_train)
    # For a run seen on another test set (geo.reports.testsets): RUN/eval/NAME, whose metrics are ``test``.
    eval_dir: Path | None = None
    test_set: str | None = None
    # What the test set can show, as recorded with the metrics (geo.training.reference): the distance from
    # the test images to the nearest train image ("train_distance_km": min, median, n_train) and the
    # densest-cell baseline of the run's partition ("densest_cell"); empty for runs scored before.
    reference: dict = field(default_factory=dict)
    # "frozen" (a head on cached features) or "end-to-end" (`geo finetune`: backbone and head trained together).
    features: str = "frozen"
    parent: str | None = None  # an end-to-end run's parent run directory (config.json's parent_run)
    # A knn run's search index, as its metrics.json records it (knn_index, knn_index_build_s, knn_recall@k ...).
    knn_index: dict = field(default_factory=dict)

    @property
    def train_min_km(self) -> float | None:
        """Smallest distance (km) from a test image to the nearest train image, None if not recorded."""
        value = (self.reference.get(TRAIN_DISTANCE_KEY) or {}).get("min")
        return float(value) if _finite(value) else None

    @property
    def family(self) -> str:
        """The name shared by a frozen run and its end-to-end children (tables put them side by side)."""
        return Path(self.parent).name if self.parent else self.name

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def predictions_path(self) -> Path:
        return (self.eval_dir or self.path) / PREDICTIONS_FILE

    def metric(self, key: str) -> float | None:
        """Final test value of ``key`` or None."""
        return self.test.get(key)

    def ci(self, key: str) -> tuple[float, float] | None:
        """Bootstrap 95 % interval of the final test ``key`` or None."""
        return self.test_ci.get(key)

    def best_val(self, key: str = SELECT_KEY) -> float | None:
        """Best validation value of ``key`` over the history (None without history)."""
        values = [h["val"].get(key) for h in self.history if h.get("val")]
        values = [v for v in values if _finite(v)]
        if not values:
            return None
        return max(values) if HIGHER_IS_BETTER.get(key, True) is not False else min(values)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _sweeps_kappa0(head: str) -> bool:
    """Whether ``head`` declares kappa0 among its swept options (unknown heads: no)."""
    try:
        return "kappa0" in head_class(head).sweep_options
    except ConfigError:
        return False


def _read_json(path: Path) -> Any:
    """Parsed JSON or a reason string raised as ValueError."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"corrupt: {path.name} is not valid JSON ({err.msg} at line {err.lineno})") from None
    except UnicodeDecodeError:
        raise ValueError(f"corrupt: {path.name} is not UTF-8 text") from None


def _read_history(path: Path, warnings: list[str]) -> list[dict]:
    """metrics.jsonl as dicts {step, epoch, train_loss, lr, elapsed_s, val: {metric: value}}.

    The trainer writes validation metrics flattened as "val_<metric>" keys.
    A torn last line (a killed run) is dropped by ``read_jsonl``.
    """
    if not path.exists():
        warnings.append(f"no {METRICS_LOG_FILE}: no training curves")
        return []
    history = []
    for record in read_jsonl(path):
        if not isinstance(record, dict):
            continue
        entry = {name: record.get(name) for name in _STEP_FIELDS}
        entry["val"] = {k[4:]: v for k, v in record.items() if k.startswith("val_") and _finite(v)}
        history.append(entry)
    return history


def _cache_identity(config: dict) -> tuple[str | None, str | None]:
    """(cache_path, cache_id): the id is a hash of the cache's recorded provenance."""
    cache_path, provenance = config.get("cache_path"), config.get("cache_provenance")
    if config.get("stage") == END_TO_END:
        # Trained on the same rows as its parent, starting from the parent's features: grouped with the parent's
        # cache (the features column says which rows are end to end); its path stays its own (maps read it).
        provenance = config.get("parent_cache_provenance")
    if isinstance(provenance, dict) and provenance:
        # "created" differs between otherwise identical re-extractions; it does not change features.
        stable = {k: v for k, v in provenance.items() if k not in ("created",)}
        blob = json.dumps(stable, sort_keys=True, default=str).encode()
        return cache_path, "prov-" + hashlib.sha256(blob).hexdigest()[:16]
    return cache_path, None


def read_run(path: str | Path) -> Run:
    """Read one run directory; ValueError(reason) when it cannot be used."""
    path = Path(path)
    config_path, final_path = path / CONFIG_FILE, path / METRICS_FILE
    for required in (config_path, final_path):
        if not required.exists():
            raise ValueError(f"incomplete: missing {required.name}")
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise ValueError("corrupt: config.json is not a JSON object")
    fmt = config.get("format")
    if fmt != RUN_FORMAT:
        raise ValueError(f"unknown format {fmt!r} in config.json (this report reads {RUN_FORMAT!r})")
    final = _read_json(final_path)
    test, test_ci = final_metrics(final)
    head = config.get("head")
    if not head:
        raise ValueError("corrupt: config.json names no head")

    warnings: list[str] = []
    if not test_ci:
        warnings.append("metrics.json has no bootstrap intervals: claims about this run are inconclusive")
    cache_path, cache_id = _cache_identity(config)
    n_cells, kappa0, seed, lr, n_train = (config.get(k) for k in ("n_cells", "kappa0", "seed", "lr", "n_train"))
    fraction = config.get("train_fraction", 1.0)  # runs made before --train-fraction trained on everything
    predict = config.get("predict") or final.get("predict")
    return Run(
        path=path, name=config.get("name") or path.name, config=config, head=str(head),
        n_cells=int(n_cells) if _finite(n_cells) else None,
        kappa0=float(kappa0) if _finite(kappa0) and _sweeps_kappa0(str(head)) else None,
        predict=str(predict) if predict else None,
        seed=int(seed) if _finite(seed) else None, lr=float(lr) if _finite(lr) else None,
        cache_path=str(cache_path) if cache_path else None, cache_id=cache_id,
        test=test, test_ci=test_ci, history=_read_history(path / METRICS_LOG_FILE, warnings),
        warnings=warnings, split=final.get("split"),
        train_fraction=float(fraction) if _finite(fraction) else 1.0,
        n_train=int(n_train) if _finite(n_train) else None, reference=reference_of(final),
        features=END_TO_END if config.get("stage") == END_TO_END else FROZEN,
        parent=str(config["parent_run"]) if config.get("parent_run") else None,
        knn_index={k: v for k, v in final.items() if k.startswith("knn_")},
    )


def reference_of(final: Any) -> dict:
    """The reference keys of a metrics.json (``geo.training.reference``) that are well-formed dicts."""
    if not isinstance(final, dict):
        return {}
    metrics = final["metrics"] if isinstance(final.get("metrics"), dict) else final
    found = {k: metrics[k] for k in (TRAIN_DISTANCE_KEY, DENSEST_CELL_KEY) if isinstance(metrics.get(k), dict)}
    if isinstance(metrics.get("n"), int):
        found["n"] = metrics["n"]  # the images evaluated
    return found


def final_metrics(final: Any) -> tuple[dict, dict]:
    """``(test, test_ci)`` of a metrics.json (a run's own or an evaluation's); ValueError(reason) if unusable."""
    if not isinstance(final, dict):
        raise ValueError("corrupt: metrics.json is not a JSON object")
    metrics = final["metrics"] if isinstance(final.get("metrics"), dict) else final
    missing = [k for k in ACC_KEYS if not _finite(metrics.get(k))]
    if missing:
        raise ValueError(f"corrupt: metrics.json lacks {', '.join(missing)}")
    test = {k: float(metrics[k]) if _finite(metrics.get(k)) else None for k in METRIC_KEYS}
    raw_ci = metrics.get("ci") or {}
    test_ci = {k: (float(v[0]), float(v[1])) for k, v in raw_ci.items()
               if isinstance(v, (list, tuple)) and len(v) == 2 and all(_finite(x) for x in v)}
    return test, test_ci


def _candidate_dirs(root: Path, depth: int) -> list[Path]:
    """Directories under ``root`` (itself included, ``depth`` levels down) holding any run file."""
    if any((root / name).exists() for name in RUN_FILES):
        return [root]
    if depth == 0:
        return []
    found: list[Path] = []
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found.extend(_candidate_dirs(child, depth - 1))
    return found


def find_runs(paths: Iterable[str | Path], *, max_depth: int = 2) -> tuple[list[Run], list[SkippedRun]]:
    """Read every run directory given, or found up to ``max_depth`` levels below a sweep directory.

    Returns (runs in a stable order: head, c, kappa0, predict, name; skipped with reasons).
    A directory listed twice is read once.
    """
    runs: list[Run] = []
    skipped: list[SkippedRun] = []
    seen: set[Path] = set()
    for given in paths:
        given = Path(given)
        if not given.is_dir():
            skipped.append(SkippedRun(given, "not a directory" if given.exists() else "does not exist"))
            continue
        candidates = _candidate_dirs(given, max_depth)
        if not candidates:
            skipped.append(SkippedRun(given, f"no run directory (none of {', '.join(RUN_FILES)}) found"))
        for directory in candidates:
            if directory.resolve() in seen:
                continue
            seen.add(directory.resolve())
            try:
                runs.append(read_run(directory))
            except ValueError as err:
                skipped.append(SkippedRun(directory, str(err)))
            except OSError as err:
                skipped.append(SkippedRun(directory, f"unreadable: {err}"))
    runs.sort(key=run_sort_key)
    return runs, skipped


def run_sort_key(run: Run) -> tuple:
    """Table order: head, c, kappa0, prediction mode, name (None sorts first); an end-to-end run right after its
    parent (same family name, frozen first)."""
    return _none_first((run.head, run.n_cells, run.kappa0, run.predict, run.family, run.features != FROZEN, run.name))


def check_caches(runs: list[Run], *, allow_mixed: bool) -> dict[str, str]:
    """Refuse runs made on different caches unless ``allow_mixed``; then label them.

    Returns {label: description} ("A": "cache.h5 (prov-1234...)") and sets ``run.cache_label``
    when more than one cache is present; {} when all runs share one cache (or record none).
    Raises ReportError naming the caches and runs otherwise.
    """
    groups: dict[str | None, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.cache_id, []).append(run)
    if len(groups) <= 1:
        return {}
    descriptions = {}
    for index, (cache_id, members) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        label = chr(ord("A") + index) if index < 26 else f"C{index}"
        paths = sorted({Path(r.cache_path).name for r in members if r.cache_path}) or ["(no cache recorded)"]
        descriptions[label] = f"{', '.join(paths)} [{cache_id or 'no provenance recorded'}], {len(members)} run(s)"
        for run in members:
            run.cache_label = label
    if not allow_mixed:
        listing = "; ".join(f"{label}: {text} e.g. {next(r.path for r in runs if r.cache_label == label)}"
                            for label, text in descriptions.items())
        for run in runs:
            run.cache_label = None
        raise ReportError(f"runs were made on different feature caches ({listing}); "
                          "side-by-side tables would compare different features. "
                          "Pass --allow-mixed-caches to report them anyway, labelled by cache.")
    return descriptions


def pick_one(runs: list[Run]) -> Run:
    """Among runs of one configuration, the one with the best validation SELECT_KEY (then by name)."""
    by_name = sorted(runs, key=lambda r: r.name)  # max() keeps the first of equals: ties go by name
    return max(by_name, key=lambda r: r.best_val() if r.best_val() is not None else -math.inf)


# The fields held fixed along a series of group_series, per varied field.
SERIES_FIXED = {"n_cells": ("head", "kappa0", "predict", "train_fraction"),
                "kappa0": ("head", "n_cells", "predict", "train_fraction"),
                "n_train": ("head", "n_cells", "kappa0", "predict")}


def group_series(runs: list[Run], vary: str) -> dict[tuple, list[tuple[float, Run]]]:
    """Runs grouped into series along one field, the others fixed.

    ``vary`` is "n_cells" (series key: head, kappa0, predict, train fraction), "kappa0" (key:
    head, n_cells, predict, train fraction) or "n_train" (learning curves; key: head, n_cells,
    kappa0, predict). Each series is [(x, run)] sorted by x; duplicates at one x (other seeds,
    learning rates) are resolved by ``pick_one``. Runs without a value for ``vary`` are left out.
    """
    fixed = SERIES_FIXED[vary]
    cells: dict[tuple, dict[float, list[Run]]] = {}
    for run in runs:
        x = getattr(run, vary)
        if x is None:
            continue
        key = tuple(getattr(run, name) for name in fixed)
        cells.setdefault(key, {}).setdefault(float(x), []).append(run)
    return {key: [(x, pick_one(by_x[x])) for x in sorted(by_x)]
            for key, by_x in sorted(cells.items(), key=lambda kv: _none_first(kv[0]))}


def _none_first(values: tuple) -> tuple:
    """A sort key for tuples that may hold None (None first, then by value)."""
    return tuple((v is not None, v if v is not None else 0) for v in values)


def series_label(key: tuple, vary: str) -> str:
    """Legend text of a series key from ``group_series`` (a train fraction only when it is not 1)."""
    fields = dict(zip(SERIES_FIXED[vary], key))
    parts = [fields["head"]]
    if "n_cells" in fields and _uses_cells(fields["head"]):
        parts.append(f"c={fields['n_cells']}")
    if fields.get("kappa0") is not None:
        parts.append(f"κ0={fields['kappa0']:g}")
    if fields.get("predict"):
        parts.append(fields["predict"])
    if fields.get("train_fraction", 1.0) != 1.0:
        parts.append(f"f={fields['train_fraction']:g}")
    return " ".join(parts)


def _uses_cells(head: str) -> bool:
    """Whether ``head`` is built over a partition's cells (unknown heads: yes, c is then shown)."""
    try:
        return head_class(head).uses_partition
    except ConfigError:
        return True
