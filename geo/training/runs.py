"""Run directories (format ``geo-run/1``): reading and writing their files.

A run directory ``runs/NAME/`` holds

- ``config.json``: every resolved option of the run, ``"format": "geo-run/1"``,
  the cache path and the cache's provenance;
- ``metrics.jsonl``: one JSON object per evaluation during training (step,
  epoch, train_loss, lr, ``val_*`` metrics, elapsed_s);
- ``checkpoint.pt``: loadable with ``torch.load(weights_only=True)``: config,
  head state, partition state, optimizer state, step / epoch / position in the
  epoch, RNG state, and the best (selected) head state;
- ``metrics.json``: final metrics of the selected model on one split
  (``geo.metrics.summarize`` + ``"split"``, ``"predict"``);
- ``predictions.parquet``: one row per evaluated image: id, lat, lon,
  pred_lat, pred_lon, dist_km, topk_lat, topk_lon, topk_prob (lists of k),
  log_density (nats per steradian at the true point; null without a density);
- ``eval/NAME/``: one folder per later ``geo evaluate`` (``metrics.json`` and
  ``predictions.parquet`` as above, for another test set or split); evaluating
  never touches the run's own files, so a report reads the run's test results
  and each further test set apart (``eval_dir``, ``list_evaluations``).

Every file is written under a temporary name and renamed (``geo.files.atomic_write``),
so a killed run never leaves a half-written file under the final name.

``build_head`` re-creates a run's head from its configuration (the head class
says how: ``Head.options_from_config``; the options recorded as ``head_options``
win when present) and ``load_head(run_dir)`` loads a finished run's selected
head: the one way evaluate, reports and ``geo predict`` get a run's head (a
retrieval head gets its gallery from the cache the run records, checked against
the recorded content hash: ``geo.training.gallery``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geo.errors import ConfigError, GeoError
from geo.files import atomic_torch_save, atomic_write, atomic_write_bytes, temporary_path
from geo.metrics import AREA_LEVELS, area_key
from geo.heads import Head, create_head, head_class
from geo.sphere.partition import Partition

RUN_FORMAT = "geo-run/1"
CONFIG_FILE = "config.json"
METRICS_LOG_FILE = "metrics.jsonl"
METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "checkpoint.pt"
PREDICTIONS_FILE = "predictions.parquet"
EVAL_DIR = "eval"

# Provenance keys that describe which images were read, not how features were made: a test
# set extracted `--like` a training cache differs from it only in these, and a test set
# imported (`geo cache import`, geo.cache.importer) with the same backbone name in the last four.
MANIFEST_PROVENANCE_KEYS = frozenset({"manifest_sha256", "like_cache", "like_manifest_sha256",
                                      "imported_from", "import_format", "source_sha256", "import_options"})

# Keys of config.json that may differ between a run and its resumption: where the
# cache is (its provenance is compared), what follows from other keys, the code version.
_RESUME_IGNORED_KEYS = frozenset({"cache_path", "head_options", "geo_version"})


class RunError(GeoError):
    """A run directory that is missing files or holds unreadable ones."""


def json_default(value: Any):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def json_safe(obj):
    """``obj`` converted to plain JSON types (what config.json and the checkpoint store)."""
    return json.loads(json.dumps(obj, default=json_default))


def _clean_json(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_json(v) for v in value]
    if isinstance(value, (float, np.floating)) and not math.isfinite(float(value)):
        return None
    return value


def write_json(path: Path, obj: dict) -> None:
    """Pretty JSON, atomically."""
    text = json.dumps(_clean_json(obj), indent=2, sort_keys=False, default=json_default)
    atomic_write_bytes(Path(path), (text + "\n").encode())


def read_json(path: Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path}: not found") from None
    except json.JSONDecodeError as err:
        raise RunError(f"{path}: not valid JSON ({err})") from None


def append_jsonl(path: Path, obj: dict) -> None:
    """Append one JSON line (flushed and synced, so a kill loses at most this line)."""
    line = json.dumps(_clean_json(obj), default=json_default)
    with open(path, "a") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: Path) -> list[dict]:
    """All complete lines of a ``metrics.jsonl`` (a torn last line is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_jsonl(path: Path, *, max_step: int) -> None:
    """Drop lines logged after ``max_step`` (evaluations a resumed run will redo)."""
    path = Path(path)
    if not path.exists():
        return
    keep = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= max_step]
    text = "".join(json.dumps(r, default=json_default) + "\n" for r in keep)
    atomic_write_bytes(path, text.encode())


def config_differences(old: dict, new: dict) -> list[str]:
    """Keys whose values differ between two configs, as ``key: old -> new`` lines."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        if key in _RESUME_IGNORED_KEYS:
            continue
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        # Compare through JSON so tuples/lists and ints/floats read back alike.
        if json.dumps(_clean_json(a), sort_keys=True, default=json_default) != json.dumps(
            _clean_json(b), sort_keys=True, default=json_default
        ):
            diffs.append(f"{key}: {a!r} -> {b!r}")
    return diffs


def feature_provenance_differences(trained_on: dict, other: dict) -> list[str]:
    """``config_differences`` of two caches' provenance, ignoring which manifest was read.

    Two caches made by the same checkpoint, transform, image size and precision hold
    comparable features whatever images they hold (``geo extract --like``).
    """
    keep = lambda prov: {k: v for k, v in prov.items() if k not in MANIFEST_PROVENANCE_KEYS}  # noqa: E731
    return config_differences(keep(trained_on), keep(other))


def eval_dir(run_dir: Path, name: str) -> Path:
    """``RUN/eval/NAME``: where ``geo evaluate`` writes one evaluation (NAME checked: one plain folder name)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"--name {name!r}: use a plain folder name (no '/', not '.' or '..')")
    return Path(run_dir) / EVAL_DIR / name


def list_evaluations(run_dir: Path) -> list[Path]:
    """The ``RUN/eval/*`` folders holding a ``metrics.json``, sorted by name."""
    root = Path(run_dir) / EVAL_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / METRICS_FILE).is_file())


def save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save`` to a temporary file, then rename (never a torn checkpoint)."""
    atomic_torch_save(path, state)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True`` (no code runs from the file)."""
    path = Path(path)
    if not path.exists():
        raise RunError(f"{path}: no checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a torn or foreign file: the user's to fix
        raise RunError(f"{path}: cannot load checkpoint ({type(err).__name__}: {err})") from None


def read_config(run_dir: Path) -> dict:
    """``config.json`` of a run, checked for the run format."""
    config = read_json(Path(run_dir) / CONFIG_FILE)
    if config.get("format") != RUN_FORMAT:
        raise RunError(f"{Path(run_dir) / CONFIG_FILE}: format {config.get('format')!r}, expected {RUN_FORMAT!r}")
    return config


def check_run_dir(run_dir: Path, config: dict, *, overwrite: bool, implied: dict | None = None) -> bool:
    """Prepare ``run_dir`` for ``config``; True when it holds a run to resume.

    An empty or missing directory is created. A directory holding the same
    configuration is resumed (True if it has a checkpoint). A different
    configuration raises ``ConfigError`` listing the differing keys, unless
    ``overwrite``, which deletes the run's files (and only those). ``implied``
    gives, for keys a run written by an older geo lacks, the value it implicitly
    had (``geo.training.config.implied_by_older_runs``), so such runs still resume.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / CONFIG_FILE
    if not config_path.exists():
        if (run_dir / CHECKPOINT_FILE).exists() and not overwrite:
            raise ConfigError(f"{run_dir}: holds {CHECKPOINT_FILE} but no {CONFIG_FILE}; use --overwrite to start anew")
        clear_run_files(run_dir)
        return False
    if overwrite:
        clear_run_files(run_dir)
        return False
    old = {**(implied or {}), **read_json(config_path)}
    diffs = config_differences(old, _clean_json(json.loads(json.dumps(config, default=json_default))))
    if diffs:
        raise ConfigError(
            f"{run_dir} holds a run with a different configuration ({len(diffs)} keys differ: "
            + "; ".join(diffs)
            + "). Use another --out, or --overwrite to replace it."
        )
    return (run_dir / CHECKPOINT_FILE).exists()


def clear_run_files(run_dir: Path) -> None:
    """Delete the files a run writes (nothing else in the directory)."""
    for name in (CONFIG_FILE, METRICS_LOG_FILE, METRICS_FILE, CHECKPOINT_FILE, PREDICTIONS_FILE):
        for p in (Path(run_dir) / name, temporary_path(Path(run_dir) / name)):
            p.unlink(missing_ok=True)


def write_predictions(
    path: Path,
    *,
    ids: np.ndarray,
    lat_deg: np.ndarray,
    lon_deg: np.ndarray,
    pred_lat_deg: np.ndarray,
    pred_lon_deg: np.ndarray,
    dist_km: np.ndarray,
    topk_lat_deg: np.ndarray,
    topk_lon_deg: np.ndarray,
    topk_prob: np.ndarray,
    log_density: np.ndarray | None,
    hpd_level: np.ndarray | None = None,
    area_km2: np.ndarray | None = None,
) -> None:
    """Write ``predictions.parquet`` (``topk_*`` are ``[n, k]``, stored as fixed-size lists).

    ``hpd_level [n]`` (the mass of the density above its value at the truth) and ``area_km2 [n, 2]``
    (the 50 % and 95 % credible regions' areas) are columns ``hpd_level``, ``area50_km2``,
    ``area95_km2``: nulls for a head without a density.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, k = np.asarray(topk_prob).shape

    def fixed_list(a: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(a, np.float64).reshape(-1)), k)

    columns = {
        "id": pa.array([str(i) for i in ids], pa.string()),
        "lat": pa.array(np.asarray(lat_deg, np.float64)),
        "lon": pa.array(np.asarray(lon_deg, np.float64)),
        "pred_lat": pa.array(np.asarray(pred_lat_deg, np.float64)),
        "pred_lon": pa.array(np.asarray(pred_lon_deg, np.float64)),
        "dist_km": pa.array(np.asarray(dist_km, np.float64)),
        "topk_lat": fixed_list(topk_lat_deg),
        "topk_lon": fixed_list(topk_lon_deg),
        "topk_prob": fixed_list(topk_prob),
        "log_density": (
            pa.array(np.asarray(log_density, np.float64)) if log_density is not None else pa.nulls(n, pa.float64())
        ),
        "hpd_level": (
            pa.array(np.asarray(hpd_level, np.float64)) if hpd_level is not None else pa.nulls(n, pa.float64())
        ),
    }
    for j, name in enumerate(area_key(level) for level in AREA_LEVELS):
        columns[name] = (pa.array(np.asarray(area_km2, np.float64)[:, j]) if area_km2 is not None
                         else pa.nulls(n, pa.float64()))
    with atomic_write(path) as handle:
        pq.write_table(pa.table(columns), handle)


def build_head(config: dict, partition, feature_dim: int, device: torch.device | str = "cpu", *,
               saved: dict | None = None) -> Head:
    """The head of a run ``config`` (over ``partition``, a Partition or its state dict, for cell heads).

    With ``saved`` (a checkpoint) it gets the selected (best-on-val) weights.
    """
    cls = head_class(config["head"])
    options = config.get("head_options") or cls.options_from_config(config)
    if isinstance(partition, dict):
        partition = Partition.from_state_dict(partition)
    head = create_head(config["head"], feature_dim=feature_dim, partition=partition, **options)
    if saved is not None:
        best = saved.get("best") or {}
        head.load_state_dict(best.get("head_state") or saved["head_state"])
    return head.to(device)


@dataclass
class RunHead:
    """A run's selected head (eval mode) and what it was built from."""

    head: Head
    config: dict  # config.json
    partition: Partition | None
    selected_step: int | None  # the step whose weights were selected on val


def load_head(run_dir: str | Path, device: torch.device | str = "cpu") -> RunHead:
    """Load run ``run_dir``'s selected (best-on-val) head from ``config.json`` and ``checkpoint.pt``."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    checkpoint = load_checkpoint(run_dir / CHECKPOINT_FILE)
    partition = Partition.from_state_dict(checkpoint["partition"]) if checkpoint.get("partition") else None
    merged = dict(checkpoint["config"], head_options=config.get("head_options") or checkpoint["config"].get(
        "head_options"))
    head = build_head(merged, partition, int(config["cache_feature_dim"]), device, saved=checkpoint).eval()
    if head.needs_gallery:  # retrieval: the gallery is read from the run's cache, checked unchanged
        from geo.training.gallery import attach_gallery
        attach_gallery(head, config)
    return RunHead(head, config, partition, (checkpoint.get("best") or {}).get("step"))
