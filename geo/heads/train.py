"""``fit_head``: train one output head on a feature cache, select it on val, score it on test.

``fit_head`` is one ``HeadTrainer`` (geo/heads/trainer.py) driven by
``train_together``, the loop that ``geo sweep`` drives with many trainers at
once. What it does: build the partition from the train split's locations,
create the head, AdamW with linear warm-up and cosine decay, a pass
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
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from geo import __version__
from geo.errors import ConfigError, GeoError
from geo.heads import create_head, list_heads, runs
from geo.devices import resolve_device, resolve_precision
from geo.heads.evaluate import CountryFn

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
    from geo.heads.trainer import HeadTrainer, split_rows, train_together  # it imports this module

    out_dir = Path(out_dir)
    with FeatureCache(cache_path) as cache:
        rows_by_split = split_rows(cache)
        cfg = resolve_config(config, cache, Path(cache_path), len(rows_by_split["train"]), len(rows_by_split["val"]))
        resume = runs.check_run_dir(out_dir, cfg, overwrite=overwrite)
        trainer = HeadTrainer(cache, cfg, out_dir, resume=resume)
        bar = tqdm(total=cfg["total_steps"], initial=trainer.state["step"], disable=not progress, unit="step",
                   desc=f"fit {cfg['head']}", dynamic_ncols=True)
        train_together(cache, [trainer], bar=bar,
                       callback=None if callback is None else lambda t, step, loss: callback(step, loss))
        bar.close()
        return trainer.finish(country_fn=country_fn, progress=progress)
