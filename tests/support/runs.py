"""Synthetic run directories (format geo-run/1) written file by file, as geo.training writes them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from geo.training import runs as run_files
from geo.metrics import DISTANCE_SCALES_KM, accuracy_key, summarize

PROVENANCE = {"backbone": "wide_resnet50_2", "weights": "ab" * 32, "image_size": 224,
              "transform": "resize 256, centre crop 224", "manifest_sha256": "cd" * 32, "created": "2026-01-01"}


def base_config(head: str, n_cells: int, kappa0: float | None, *, cache_path="/data/cache.h5",
                provenance=None, **extra) -> dict:
    config = {"format": run_files.RUN_FORMAT, "head": head, "n_cells": n_cells,
              "kappa0": 16.0 if kappa0 is None else kappa0, "train_mu": True, "train_kappa": True,
              "mu_init": "centre", "predict": "argmax" if head == "mvmf" else "centre", "batch_size": 64,
              "lr": 1e-3, "epochs": 2, "seed": 0, "precision": "fp32", "select_by": "geoscore",
              "cache_path": str(cache_path), "cache_feature_dim": 8, "cache_provenance": provenance or PROVENANCE}
    config.update(extra)
    return config


def write_run(run_dir: Path, *, head: str = "mvmf", n_cells: int = 64, kappa0: float | None = 16.0,
              acc: dict | list | None = None, half_width: float = 0.01, nll: float | None = 5.0,
              history_steps: int = 3, config: dict | None = None, val_geoscore: float | None = None,
              n_train: int | None = None, train_fraction: float | None = None) -> Path:
    """A finished run whose test accuracies are ``acc`` (fractions per scale) with intervals acc ± half_width.

    ``n_train`` / ``train_fraction``: recorded in config.json as ``geo sweep --train-fraction`` does
    (a learning-curve run trained on ``n_train`` rows); nll is then written for every head.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = config or base_config(head, n_cells, kappa0)
    if n_train is not None:
        config = dict(config, n_train=n_train, train_fraction=1.0 if train_fraction is None else train_fraction)
    if isinstance(acc, (list, tuple)):
        acc = dict(zip(DISTANCE_SCALES_KM, acc))
    acc = acc or {s: min(1.0, 0.05 + 0.15 * i) for i, s in enumerate(DISTANCE_SCALES_KM)}
    metrics = {"n": 500, **{accuracy_key(s): a for s, a in acc.items()},
               "median_km": 900.0, "mean_km": 1800.0, "geoscore": 2500.0, "country_acc": 0.3}
    if nll is not None and (head == "mvmf" or n_train is not None):
        metrics["nll_nats"] = nll
    metrics["ci"] = {k: [v - half_width * (1 if k.startswith("acc") else 50),
                         v + half_width * (1 if k.startswith("acc") else 50)]
                     for k, v in metrics.items() if k != "n"}
    metrics.update(split="test", predict=config["predict"])
    run_files.write_json(run_dir / run_files.CONFIG_FILE, config)
    run_files.write_json(run_dir / run_files.METRICS_FILE, metrics)
    for step in range(1, history_steps + 1):
        line = {"step": step * 10, "epoch": step - 1, "train_loss": 10.0 / step, "lr": 1e-3,
                "val_acc@750km": 0.1 * step, "val_geoscore": val_geoscore or 1000.0 * step,
                "val_ci": {"acc@750km": [0, 1]}, "elapsed_s": step * 1.5}
        if head == "mvmf":
            line["val_nll_nats"] = 8.0 - step
        run_files.append_jsonl(run_dir / run_files.METRICS_LOG_FILE, line)
    return run_dir


def write_summarized_run(run_dir: Path, *, head: str, n_cells: int, kappa0: float | None, scale_km: float,
                         seed: int, config: dict | None = None) -> Path:
    """A run whose metrics.json comes from geo.metrics.summarize of random errors (median ~scale_km)."""
    rng = np.random.default_rng(seed)
    dist_km = rng.exponential(scale_km, size=200)
    log_density = rng.normal(-5, 1, size=200) if head == "mvmf" else None
    metrics = summarize(dist_km, log_density=log_density, n_bootstrap=100, seed=seed)
    write_run(run_dir, head=head, n_cells=n_cells, kappa0=kappa0, config=config)
    config = json.loads((run_dir / run_files.CONFIG_FILE).read_text())
    run_files.write_json(run_dir / run_files.METRICS_FILE, dict(metrics, split="test", predict=config["predict"]))
    return run_dir
