"""``fit_head``: train one output head on a feature cache, select it on val, score it on test.

One plain loop, top to bottom: build the partition from the train split's
locations, create the head, AdamW with linear warm-up and cosine decay, a pass
over ``cache.iter_batches("train")`` per epoch, an evaluation on the val split
every ``eval_every`` steps (a line in ``metrics.jsonl`` and a checkpoint each
time), and at the end the selected (best-on-val) model is scored on the test
split (``metrics.json``, ``predictions.parquet``). A run directory that holds
a checkpoint of the same configuration is resumed, bit-identically: the
checkpoint holds the step, the epoch and the position in it, the optimizer
moments, the RNG state and the best model so far; the data order of each
epoch is a function of (seed, epoch) alone.

Model selection: the val GeoScore (mean 5000 exp(-d / 1492.7 km)) by default.
It rewards every scale at once and moves smoothly, where acc@750km is a step
function and val NLL is known to disagree with accuracy (paper fig. 3). The
rule is ``config.select_by`` and is recorded in ``config.json``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from geo import __version__
from geo.errors import CacheError, ConfigError, GeoError
from geo.geometry import latlon_to_xyz
from geo.heads import create_head, list_heads, runs
from geo.heads.evaluate import (CountryFn, evaluate_split, feature_dtype, features_to_tensor, resolve_device,
                                resolve_precision, score_and_write)

# Prediction modes each built-in head offers; the first is its default.
PREDICT_MODES = {"mvmf": ("argmax", "mode"), "softmax": ("centre", "mean")}
# Metrics where smaller is better (for model selection); all others: larger is better.
_LOWER_IS_BETTER = ("nll_nats", "median_km", "mean_km")
# Bytes per row and cell of the [b, c] float32 tensors one chunk keeps alive: logits, their
# gradient, the loss's log-softmax and its gradient (heads chunk their own larger temporaries).
# Chunks as large as possible: every chunk recasts W to bf16 and accumulates a full W gradient.
_BYTES_PER_ROW_CELL = 16


class TrainingError(GeoError):
    """Training diverged (a NaN or infinite loss)."""


@dataclass
class FitConfig:
    """Every option of ``fit_head``; defaults suit this project's 2-core CPU.

    On a GPU use a larger ``batch_size`` (8192-65536) and scale ``lr`` with it.
    """

    head: str = "mvmf"  # a name from geo.heads.list_heads()
    n_cells: int = 1024  # c: cells of the adaptive S2 partition = mixture components / classes
    kappa0: float = 16.0  # MvMF: initial log kappa (16 -> kappa = e^16, ~2.5 km 50% radius)
    train_mu: bool = True  # MvMF: learn the component means
    train_kappa: bool = True  # MvMF: learn the concentrations
    mu_init: str = "centre"  # MvMF: initial means at the cell "centre" or the training points' "mean"
    predict: str | None = None  # None = the head's default (mvmf: argmax, softmax: centre)
    batch_size: int = 1024
    lr: float = 1e-3
    epochs: int = 10
    warmup_fraction: float = 0.05  # of all steps, linear from 0 to lr
    min_lr_fraction: float = 0.01  # cosine decays to lr * this
    weight_decay: float = 0.0  # decoupled (AdamW), on W only; 0 = plain Adam
    eval_every: int = 0  # steps between val evaluations; 0 = once per epoch
    select_by: str = "geoscore"  # val metric choosing the model (a geo.metrics.summarize key)
    seed: int = 0
    device: str = "auto"  # auto = cuda, then mps, then cpu
    precision: str = "auto"  # W x product: "bf16", "fp32", or auto (bf16 where supported); vMF terms fp32+
    max_memory_mb: int = 2048  # bound on the [B, c] temporaries; batches are chunked to fit


def json_safe(obj):
    """``obj`` converted to plain JSON types (what config.json and the checkpoint store)."""
    return json.loads(json.dumps(obj, default=runs._json_default))


def head_options(config: dict) -> dict:
    """Keyword options of ``create_head`` for ``config["head"]`` (from config.json)."""
    matmul = "bfloat16" if config["precision"] == "bf16" else None
    if config["head"] == "mvmf":
        return dict(kappa0=config["kappa0"], train_mu=config["train_mu"], train_kappa=config["train_kappa"],
                    mu_init=config["mu_init"], matmul_dtype=matmul)
    if config["head"] == "softmax":
        return dict(predict_at=config["predict"], matmul_dtype=matmul)
    return dict(matmul_dtype=matmul)


def build_head(config: dict, partition, feature_dim: int, device: torch.device, *, saved=None):
    """The head of ``config`` over ``partition`` (a Partition or its state dict), on ``device``.

    With ``saved`` (a checkpoint) it gets the selected (best-on-val) weights.
    """
    from geo.heads.partition import Partition

    if isinstance(partition, dict):
        partition = Partition.from_state_dict(partition)
    head = create_head(config["head"], feature_dim=feature_dim, partition=partition, **head_options(config))
    if saved is not None:
        best = saved.get("best") or {}
        head.load_state_dict(best.get("head_state") or saved["head_state"])
    return head.to(device)


def check_predict(head: str, predict: str | None) -> str:
    """The prediction mode ``predict`` (None = the head's default), refused if ``head`` does not offer it."""
    modes = PREDICT_MODES.get(head)
    predict = predict or (modes[0] if modes else "argmax")
    if modes and predict not in modes:
        why = " (it has no density to maximise)" if predict == "mode" else ""
        raise ConfigError(f"--predict {predict} is not available for head {head!r}{why}; "
                          f"choose one of: {', '.join(modes)}")
    return predict


def resolve_config(config: FitConfig, cache, cache_path: Path, n_train: int, n_val: int) -> dict:
    """``config`` with every automatic choice made, plus what the run was built from (config.json)."""
    if config.head not in list_heads():
        raise ConfigError(f"unknown head {config.head!r}; known heads: {', '.join(list_heads())}")
    predict = check_predict(config.head, config.predict)
    for name in ("n_cells", "batch_size", "epochs", "max_memory_mb"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be >= 1, not {getattr(config, name)}")
    if config.eval_every < 0 or config.lr <= 0 or not 0 <= config.warmup_fraction < 1:
        raise ConfigError("eval_every must be >= 0, lr > 0 and warmup_fraction in [0, 1)")
    if config.mu_init not in ("centre", "mean"):
        raise ConfigError(f"--mu-init must be centre or mean, not {config.mu_init!r}")
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    steps_per_epoch = -(-n_train // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    chunk_rows = max(1, min(config.batch_size, config.max_memory_mb * 2**20 // (config.n_cells * _BYTES_PER_ROW_CELL)))
    resolved = dataclasses.asdict(config)
    resolved.update(
        format=runs.RUN_FORMAT, geo_version=__version__, predict=predict, device=str(device), precision=precision,
        eval_every=config.eval_every or steps_per_epoch, select_mode="min" if config.select_by in _LOWER_IS_BETTER
        else "max", optimizer="adamw", lr_schedule="linear-warmup-cosine",
        warmup_steps=int(round(config.warmup_fraction * total_steps)), steps_per_epoch=steps_per_epoch,
        total_steps=total_steps, chunk_rows=chunk_rows, eval_batch_size=chunk_rows, topk=5,
        n_train=n_train, n_val=n_val, cache_path=str(Path(cache_path).resolve()),
        cache_feature_dim=cache.feature_dim, cache_n_rows=cache.n_rows, cache_provenance=cache.provenance,
    )
    return json_safe(resolved)


def lr_at(step: int, config: dict) -> float:
    """Learning rate of 0-based ``step``: linear warm-up, then cosine down to lr * min_lr_fraction."""
    lr, warm, total = config["lr"], config["warmup_steps"], config["total_steps"]
    if step < warm:
        return lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    floor = config["min_lr_fraction"]
    return lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(head: torch.nn.Module, config: dict) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices (W), never on b, mu or log kappa."""
    params = [p for p in head.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2 and p.shape[0] == head.n_cells and p.shape[-1] == head.feature_dim]
    rest = [p for p in params if all(p is not q for q in decay)]
    groups = [{"params": decay, "weight_decay": config["weight_decay"]}, {"params": rest, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    try:  # the fused kernel: one pass over W's moments instead of ~10 (the optimizer is ~15 % of a step otherwise)
        return torch.optim.AdamW(groups, lr=config["lr"], fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=config["lr"])


def train_step(head, optimizer, features: torch.Tensor, targets: dict[str, torch.Tensor], chunk_rows: int
               ) -> torch.Tensor:
    """One optimizer step on a batch, chunked so [chunk, c] temporaries fit; returns the mean loss (0-d tensor).

    ``targets`` are the keyword arguments of ``head.loss`` for the batch
    (``target_xyz [B, 3]``, and ``target_cell [B]`` for heads that take it).

    The gradient is the batch mean whatever the chunking (chunk losses are
    weighted by their share of the batch). Features carry no gradient, so
    backward computes only the weight gradient of W x, never the input's.
    A non-finite loss returns before the optimizer step, leaving the weights as they were.
    """
    optimizer.zero_grad(set_to_none=True)
    batch = features.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=features.device)
    for start in range(0, batch, chunk_rows):
        x = features[start:start + chunk_rows]
        loss = head.loss(head(x), **{k: t[start:start + chunk_rows] for k, t in targets.items()}) * (x.shape[0] / batch)
        loss.backward()
        total += loss.detach().double()
    if torch.isfinite(total):
        optimizer.step()
    return total


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})}


def _cpu_state(module_or_dict) -> dict:
    sd = module_or_dict.state_dict() if hasattr(module_or_dict, "state_dict") else module_or_dict
    return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}


def fit_head(
    cache_path: str | Path,
    config: FitConfig,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    country_fn: CountryFn | None = None,
    callback: Callable[[int, float], None] | None = None,
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
    Returns:
        The final metrics of the selected model on the test split (on val when
        the cache has no test split), as written to ``metrics.json``.
    """
    from geo.cache.store import FeatureCache
    from geo.heads.partition import Partition

    out_dir = Path(out_dir)
    with FeatureCache(cache_path) as cache:
        rows_by_split = {}
        for split in ("train", "val"):
            try:
                rows_by_split[split] = cache.split_rows(split)
            except CacheError as err:
                raise CacheError(f"fit-head needs a {split} split: {err}") from None
        cfg = resolve_config(config, cache, Path(cache_path), len(rows_by_split["train"]), len(rows_by_split["val"]))
        device = resolve_device(cfg["device"])
        resume = runs.check_run_dir(out_dir, cfg, overwrite=overwrite)
        checkpoint_path = out_dir / runs.CHECKPOINT_FILE
        torch.manual_seed(cfg["seed"])  # W's Glorot initialisation
        if resume:
            saved = runs.load_checkpoint(checkpoint_path)
            partition = Partition.from_state_dict(saved["partition"])
            head = build_head(cfg, partition, cache.feature_dim, device)
            head.load_state_dict(saved["head_state"])
        else:
            train = rows_by_split["train"]
            partition = Partition.build(cache.lat_deg[train], cache.lon_deg[train], cfg["n_cells"])
            head = build_head(cfg, partition, cache.feature_dim, device)
            # Written only now that the partition and head exist: bad options leave no run behind.
            runs.write_json(out_dir / runs.CONFIG_FILE, dict(cfg, head_options=json_safe(getattr(head, "options", {}))))
        partition_state = partition.state_dict()
        optimizer = make_optimizer(head, cfg)
        state = dict(step=0, epoch=0, batch_in_epoch=0, elapsed_s=0.0, loss_sum=0.0, loss_count=0,
                     best={"step": None, "score": None, "metrics": None, "head_state": None})
        if resume:
            optimizer.load_state_dict(saved["optimizer"])
            torch.set_rng_state(saved["rng"]["torch"])
            if "cuda" in saved["rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
            state.update({k: saved[k] for k in state})
            del saved
        runs.truncate_jsonl(out_dir / runs.METRICS_LOG_FILE, max_step=state["step"])

        # Targets once for the whole cache: unit vectors (float32 is exact enough for the
        # chord form of the vMF exponent) indexed by cache row.
        target_xyz = torch.from_numpy(latlon_to_xyz(cache.lat_deg, cache.lon_deg).astype(np.float32))
        # Heads that classify cells (softmax) take the cell of each row: assigned once here,
        # not per batch on the host.
        target_cell = None
        if "target_cell" in inspect.signature(head.loss).parameters:
            target_cell = torch.from_numpy(np.asarray(partition.assign(cache.lat_deg, cache.lon_deg), np.int64))
        x_dtype = feature_dtype(cfg["precision"])
        total_steps, chunk_rows = cfg["total_steps"], cfg["chunk_rows"]
        higher_better = cfg["select_mode"] == "max"

        def evaluate_and_checkpoint() -> None:
            t0 = time.perf_counter()
            metrics, _ = evaluate_split(head, cache, "val", predict=cfg["predict"], device=device,
                                        feature_dtype=x_dtype, batch_size=cfg["eval_batch_size"])
            if cfg["select_by"] not in metrics:
                raise ConfigError(f"--select-by {cfg['select_by']!r} is not a metric of this head; "
                                  f"choose one of: {', '.join(k for k in metrics if k not in ('split', 'predict'))}")
            score = float(metrics[cfg["select_by"]])
            best = state["best"]
            improved = math.isfinite(score) and (best["score"] is None or (
                score > best["score"] if higher_better else score < best["score"]))
            if improved:
                state["best"] = {"step": state["step"], "score": score, "metrics": metrics, "head_state": _cpu_state(head)}
            state["elapsed_s"] += time.perf_counter() - t0
            line = {"step": state["step"], "epoch": state["step"] / cfg["steps_per_epoch"],
                    "train_loss": state["loss_sum"] / max(1, state["loss_count"]), "lr": lr_at(state["step"] - 1, cfg),
                    **{f"val_{k}": v for k, v in metrics.items() if k not in ("split", "predict")},
                    "best": improved, "elapsed_s": state["elapsed_s"]}
            state["loss_sum"], state["loss_count"] = 0.0, 0
            # Log first, then checkpoint: a resume drops log lines newer than its checkpoint.
            runs.append_jsonl(out_dir / runs.METRICS_LOG_FILE, line)
            runs.save_checkpoint(checkpoint_path, {
                "format": runs.RUN_FORMAT, "config": cfg, "partition": partition_state,
                "head_state": _cpu_state(head), "optimizer": optimizer.state_dict(), "rng": _rng_state(), **state,
            })
            bar.set_postfix_str(f"val {cfg['select_by']} {score:.4g}", refresh=False)

        bar = tqdm(total=total_steps, initial=state["step"], disable=not progress, unit="step", desc=f"fit {cfg['head']}",
                   dynamic_ncols=True)
        head.train()
        while state["step"] < total_steps:
            batches = cache.iter_batches("train", cfg["batch_size"], shuffle=True, seed=cfg["seed"], epoch=state["epoch"])
            for i, (rows, features) in enumerate(batches):
                if i < state["batch_in_epoch"]:
                    continue  # consumed before the checkpoint this run resumed from
                t0 = time.perf_counter()
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(state["step"], cfg)
                x = features_to_tensor(features, device, x_dtype)
                index = torch.from_numpy(rows)
                targets = {"target_xyz": target_xyz[index].to(device)}
                if target_cell is not None:
                    targets["target_cell"] = target_cell[index].to(device)
                loss = float(train_step(head, optimizer, x, targets, chunk_rows))
                if not math.isfinite(loss):
                    last = str(checkpoint_path) if checkpoint_path.exists() else "none (no evaluation yet)"
                    ids = ", ".join(str(s) for s in cache.ids[rows[:5]])
                    raise TrainingError(f"loss is {loss} at step {state['step'] + 1} (epoch {state['epoch']}); "
                                        f"batch starts with ids {ids}; last good checkpoint: {last}")
                state["step"] += 1
                state["batch_in_epoch"] = i + 1
                state["loss_sum"] += loss
                state["loss_count"] += 1
                if state["batch_in_epoch"] == cfg["steps_per_epoch"]:
                    state["epoch"], state["batch_in_epoch"] = state["epoch"] + 1, 0
                state["elapsed_s"] += time.perf_counter() - t0
                bar.update(1)
                bar.set_postfix_str(f"loss {loss:.4g}", refresh=False)
                if state["step"] % cfg["eval_every"] == 0 or state["step"] == total_steps:
                    evaluate_and_checkpoint()
                if callback is not None:
                    callback(state["step"], loss)
                if state["step"] >= total_steps or state["batch_in_epoch"] == 0:
                    break
            else:  # the iterator gave fewer batches than steps_per_epoch: start the next epoch anyway
                state["epoch"], state["batch_in_epoch"] = state["epoch"] + 1, 0
        bar.close()
        if state["best"]["head_state"] is None:  # no finite val score ever: keep the last weights
            state["best"] = dict(state["best"], step=state["step"], head_state=_cpu_state(head))
        head.load_state_dict(state["best"]["head_state"])

        try:
            final_split = "test" if len(cache.split_rows("test")) else "val"
        except CacheError:
            final_split = "val"
        return score_and_write(head, cache, final_split, cfg, out_dir, device=device, country_fn=country_fn,
                               progress=progress, selected_step=state["best"]["step"], select_by=cfg["select_by"],
                               train_elapsed_s=state["elapsed_s"])
