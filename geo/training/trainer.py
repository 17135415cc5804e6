"""``HeadTrainer``: one head's training state; ``train_together``: the loop feeding one pass of batches to many.

``fit_head`` (geo/training/fit.py) runs one trainer; ``geo sweep``
(geo/training/sweep.py) runs a group of them on one open cache, so that each
batch of features is read and converted once and fed to every head. A trainer
does exactly what a lone ``fit_head`` does with its configuration: it is seeded
the same way before its head is built, keeps its own RNG state and optimizer,
sees the same batches in the same order (a function of (seed, epoch) alone),
evaluates and checkpoints at the same steps, and writes the same run files.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from geo.devices import resolve_device, retain_freed_memory
from geo.errors import CacheError, ConfigError, GeoError
from geo.geometry import latlon_to_xyz
from geo.heads import Head, head_class
from geo.sphere.partition import Partition
from geo.training import reference, runs
from geo.training.gallery import attach_gallery
from geo.training.knn_index import index_recall
from geo.training.evaluate import (CountryFn, calibrate_on_split, evaluate_split, feature_dtype, features_to_tensor,
                                  score_and_write)
from geo.training.subsets import seeded_subset, train_subset


class TrainingError(GeoError):
    """Training diverged (a NaN or infinite loss)."""


def lr_at(step: int, config: dict) -> float:
    """Learning rate of 0-based ``step``: linear warm-up, then cosine down to lr * min_lr_fraction."""
    lr, warm, total = config["lr"], config["warmup_steps"], config["total_steps"]
    if step < warm:
        return lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    floor = config["min_lr_fraction"]
    return lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def optimizer_groups(head: Head, config: dict) -> list[dict]:
    """AdamW parameter groups of a head: weight decay only on its ``weight_decay_parameters`` (W),
    never on b, mu or log kappa."""
    params = [p for p in head.parameters() if p.requires_grad]
    decay = head.weight_decay_parameters()
    rest = [p for p in params if all(p is not q for q in decay)]
    groups = [{"params": decay, "weight_decay": config["weight_decay"]}, {"params": rest, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def adamw(groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """AdamW over ``groups``, fused where the device has the kernel."""
    try:  # the fused kernel: one pass over W's moments instead of ~10 (the optimizer is ~15 % of a step otherwise)
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr)


def make_optimizer(head: Head, config: dict) -> torch.optim.Optimizer:
    """AdamW; weight decay only on the head's ``weight_decay_parameters`` (W), never on b, mu or log kappa."""
    return adamw(optimizer_groups(head, config), config["lr"])


def train_step(head, optimizer, features: torch.Tensor, targets: dict[str, torch.Tensor], chunk_rows: int
               ) -> torch.Tensor:
    """One optimizer step on a batch, chunked so [chunk, c] temporaries fit; returns the mean loss (0-d tensor).

    ``targets`` are the keyword arguments of ``head.loss`` for the batch
    (``target_xyz [B, 3]``, and the head's ``row_targets``, e.g. ``target_cell [B]``).

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
    cuda = {"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}
    return {"torch": torch.get_rng_state(), **cuda}


def _cpu_state(module_or_dict) -> dict:
    sd = module_or_dict.state_dict() if hasattr(module_or_dict, "state_dict") else module_or_dict
    return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}


def split_rows(cache) -> dict[str, np.ndarray]:
    """Row indices of the train and val splits; CacheError when either is missing."""
    rows_by_split = {}
    for split in ("train", "val"):
        try:
            rows_by_split[split] = cache.split_rows(split)
        except CacheError as err:
            raise CacheError(f"fit-head needs a {split} split: {err}") from None
    return rows_by_split


# Second word of the val subset's seed (as geo.training.subsets' stream: never an epoch's data order).
_VAL_SUBSET_STREAM = 0x7A1


def val_rows(cache, config: dict, cap: int | None) -> np.ndarray | None:
    """The sorted val rows scoring a run's val evaluations: None (the whole split) unless the head caps them
    (``Head.val_rows_cap``) below the split's size; then a subset drawn from the run's seed alone, so
    every evaluation of a run (and of a resumed run) scores the same rows."""
    rows = cache.split_rows("val")
    if cap is None or rows.size <= cap:
        return None
    return seeded_subset(rows, cap, config["seed"], _VAL_SUBSET_STREAM)


def train_rows(cache, config: dict) -> np.ndarray:
    """The sorted cache rows a run trains on: its ``train_fraction`` subset of the train split (all by default)."""
    return train_subset(cache.split_rows("train"), config.get("train_fraction", 1.0), config["seed"])


class HeadTrainer:
    """One head's training state on an open cache: head, optimizer, targets, step counters, best model.

    Created from a resolved config (``resolve_config``) for a run directory that
    ``runs.check_run_dir`` has prepared: ``resume`` loads the checkpoint there;
    otherwise the head is seeded with ``config["seed"]`` and built over
    ``partition`` (built from the rows it trains on when None) and ``config.json`` is written.
    It trains on ``train_rows`` (``train_rows(cache, config)``: its ``train_fraction`` of the
    train split), and so does the partition it builds.
    The trainer keeps its own torch RNG state, so several trainers can share a
    process and each still draws what a lone ``fit_head`` would.

    Drive it with ``step`` once per training batch (in ``iter_batches`` order for
    ``(seed, state["epoch"])``, from position ``state["batch_in_epoch"]``), then ``finish``.
    """

    def __init__(self, cache, config: dict, out_dir: Path, *, resume: bool, partition=None,
                 target_xyz: torch.Tensor | None = None):
        self.cache, self.cfg, self.out_dir = cache, config, Path(out_dir)
        self.device = resolve_device(config["device"])
        self.checkpoint_path = self.out_dir / runs.CHECKPOINT_FILE
        saved = runs.load_checkpoint(self.checkpoint_path) if resume else None
        self.train_rows = train_rows(cache, config)
        torch.manual_seed(config["seed"])  # W's Glorot initialisation
        if resume:
            partition = Partition.from_state_dict(saved["partition"]) if saved["partition"] else None
        elif partition is None and head_class(config["head"]).uses_partition:
            train = self.train_rows
            partition = Partition.build(cache.lat_deg[train], cache.lon_deg[train], config["n_cells"])
        self.head = runs.build_head(config, partition, cache.feature_dim, self.device)
        self.val_rows = val_rows(cache, config, self.head.val_rows_cap)
        if resume:
            self.head.load_state_dict(saved["head_state"])
        # Retrieval: the gallery (its --train-fraction of the train split) is read from the cache
        # the run records, checked unchanged, never copied (and its index opened or built once).
        self.gallery_facts = attach_gallery(self.head, config, progress=True) if self.head.needs_gallery else {}
        if not resume:
            # written only now that the partition and head exist: bad options leave no run behind
            runs.write_json(self.out_dir / runs.CONFIG_FILE, config)
        self.partition = partition if self.head.uses_partition else None
        self.partition_state = partition.state_dict() if self.partition is not None else None
        self.optimizer = make_optimizer(self.head, config) if self.head.trainable else None
        if self.optimizer is not None and self.device.type == "cpu":
            # every step frees and allocates [B, c] and [c, d] tensors: reuse the memory, not fault it in anew
            retain_freed_memory()
        self.state = dict(step=0, epoch=0, batch_in_epoch=0, elapsed_s=0.0, loss_sum=0.0, loss_count=0,
                          best={"step": None, "score": None, "metrics": None, "head_state": None})
        self.rng = _rng_state()
        if resume:
            if self.optimizer is not None:
                self.optimizer.load_state_dict(saved["optimizer"])
            self.rng = saved["rng"]
            self.state.update({k: saved[k] for k in self.state})
        del saved
        runs.truncate_jsonl(self.out_dir / runs.METRICS_LOG_FILE, max_step=self.state["step"])
        # Targets once for the whole cache, indexed by cache row: unit vectors (float32 is exact
        # enough for the chord form of the vMF exponent), shareable between trainers.
        if target_xyz is None:
            target_xyz = torch.from_numpy(latlon_to_xyz(cache.lat_deg, cache.lon_deg).astype(np.float32))
        self.target_xyz = target_xyz
        # Per-row targets a head asks for (the softmax's cells): computed once here, not per batch.
        self.row_targets = self.head.row_targets(cache.lat_deg, cache.lon_deg)
        self.x_dtype = feature_dtype(config["precision"])
        self.last_score: float | None = None  # the latest val score (for progress bars)
        self.head.train()

    @property
    def done(self) -> bool:
        return self.state["step"] >= self.cfg["total_steps"]

    def evaluate_if_untrainable(self) -> None:
        """A head with nothing to train (retrieval) is evaluated once, at step 0 (unless its checkpoint has it)."""
        if not self.head.trainable and self.state["best"]["metrics"] is None:
            self.evaluate_and_checkpoint()

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, batch index in it) of the next batch this trainer needs."""
        return self.state["epoch"], self.state["batch_in_epoch"]

    def step(self, rows: np.ndarray, x: torch.Tensor) -> float:
        """One optimizer step on cache rows ``rows [b]`` with features ``x [b, d]`` (on the device, in
        ``self.x_dtype``); evaluates and checkpoints when due. Returns the batch's mean loss (nats)."""
        state, cfg = self.state, self.cfg
        t0 = time.perf_counter()
        torch.set_rng_state(self.rng["torch"])
        for group in self.optimizer.param_groups if self.optimizer is not None else ():
            group["lr"] = lr_at(state["step"], cfg)
        index = torch.from_numpy(rows)
        targets = {"target_xyz": self.target_xyz[index].to(self.device),
                   **{name: t[index].to(self.device) for name, t in self.row_targets.items()}}
        # A head with nothing to train (retrieval) only counts its steps: evaluations stay on schedule.
        loss = float(train_step(self.head, self.optimizer, x, targets, cfg["chunk_rows"])) if self.optimizer else 0.0
        self.rng = dict(self.rng, torch=torch.get_rng_state())
        if not math.isfinite(loss):
            last = str(self.checkpoint_path) if self.checkpoint_path.exists() else "none (no evaluation yet)"
            ids = ", ".join(str(s) for s in self.cache.ids[rows[:5]])
            raise TrainingError(f"loss is {loss} at step {state['step'] + 1} (epoch {state['epoch']}); "
                                f"batch starts with ids {ids}; last good checkpoint: {last}")
        state["step"] += 1
        state["batch_in_epoch"] += 1
        state["loss_sum"] += loss
        state["loss_count"] += 1
        if state["batch_in_epoch"] == cfg["steps_per_epoch"]:
            state["epoch"], state["batch_in_epoch"] = state["epoch"] + 1, 0
        state["elapsed_s"] += time.perf_counter() - t0
        if state["step"] % cfg["eval_every"] == 0 or state["step"] == cfg["total_steps"]:
            self.evaluate_and_checkpoint()
        return loss

    def end_epoch(self, epoch: int) -> None:
        """The batches of ``epoch`` ran out before ``steps_per_epoch``: start the next epoch anyway."""
        if not self.done and self.state["epoch"] == epoch:
            self.state["epoch"], self.state["batch_in_epoch"] = epoch + 1, 0

    def evaluate_and_checkpoint(self) -> float:
        """Score the head on val, keep it if best so far, log a line, save the checkpoint; returns the score."""
        state, cfg = self.state, self.cfg
        t0 = time.perf_counter()
        outputs = None
        if self.head.needs_calibration:  # e.g. the regression head's kappa: fitted on val before scoring val
            outputs = calibrate_on_split(self.head, self.cache, "val", device=self.device, feature_dtype=self.x_dtype,
                                         batch_size=cfg["eval_batch_size"])
        metrics, _ = evaluate_split(self.head, self.cache, "val", predict=cfg["predict"], device=self.device,
                                    feature_dtype=self.x_dtype, batch_size=cfg["eval_batch_size"], outputs=outputs,
                                    subset_rows=self.val_rows)
        if cfg["select_by"] not in metrics:
            raise ConfigError(f"--select-by {cfg['select_by']!r} is not a metric of this head; "
                              f"choose one of: {', '.join(k for k in metrics if k not in ('split', 'predict'))}")
        score = float(metrics[cfg["select_by"]])
        best = state["best"]
        improved = math.isfinite(score) and (best["score"] is None or (
            score > best["score"] if cfg["select_mode"] == "max" else score < best["score"]))
        if improved:
            state["best"] = {"step": state["step"], "score": score, "metrics": metrics,
                             "head_state": _cpu_state(self.head)}
        state["elapsed_s"] += time.perf_counter() - t0
        trained = self.optimizer is not None
        line = {"step": state["step"], "epoch": state["step"] / cfg["steps_per_epoch"],
                "train_loss": state["loss_sum"] / max(1, state["loss_count"]) if trained else None,
                "lr": lr_at(state["step"] - 1, cfg) if trained else None,
                **{f"val_{k}": v for k, v in metrics.items() if k not in ("split", "predict")},
                "best": improved, "elapsed_s": state["elapsed_s"]}
        state["loss_sum"], state["loss_count"] = 0.0, 0
        # Log first, then checkpoint: a resume drops log lines newer than its checkpoint.
        runs.append_jsonl(self.out_dir / runs.METRICS_LOG_FILE, line)
        runs.save_checkpoint(self.checkpoint_path, {
            "format": runs.RUN_FORMAT, "config": cfg, "partition": self.partition_state,
            "head_state": _cpu_state(self.head), "rng": self.rng, **state,
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
        })
        self.last_score = score
        return score

    def finish(self, *, country_fn: CountryFn | None = None, progress: bool = False) -> dict:
        """Load the selected (best-on-val) weights and score them on test (val without a test split)."""
        state = self.state
        if state["best"]["head_state"] is None:  # no finite val score ever: keep the last weights
            state["best"] = dict(state["best"], step=state["step"], head_state=_cpu_state(self.head))
        self.head.load_state_dict(state["best"]["head_state"])
        try:
            final_split = "test" if len(self.cache.split_rows("test")) else "val"
        except CacheError:
            final_split = "val"
        extra = dict(self.gallery_facts)
        if getattr(self.head, "search", None) is not None:  # an approximate index: its recall@k against exact, on val
            batches = (x for _, x in self.cache.iter_batches("val", self.cfg["eval_batch_size"], shuffle=False))
            extra[f"knn_recall@{self.head.max_k}"] = index_recall(self.head, batches, self.device)
        metrics = score_and_write(self.head, self.cache, final_split, self.cfg, self.out_dir, device=self.device,
                                  country_fn=country_fn, progress=progress, selected_step=state["best"]["step"],
                                  select_by=self.cfg["select_by"], train_elapsed_s=state["elapsed_s"],
                                  train_lat_lon=reference.train_locations(self.cache), partition=self.partition,
                                  **extra)
        stats = getattr(self.head, "search_stats", None)
        if stats is not None:  # retrieval: the time its searches took in this process (val, test, recall)
            metrics.update(knn_search_s=stats["exact_s"] + stats["index_s"],
                           knn_search_queries=stats["exact_queries"] + stats["index_queries"],
                           knn_index_search_s=stats["index_s"], knn_index_search_queries=stats["index_queries"])
            runs.write_json(self.out_dir / runs.METRICS_FILE, metrics)
        return metrics


def train_together(cache, trainers: list[HeadTrainer], *, bar=None,
                   callback: Callable[[HeadTrainer, int, float], None] | None = None) -> None:
    """Train ``trainers`` to their last step in one pass per epoch over the train split.

    Each batch is read and converted to a tensor once and fed to every trainer
    whose next position it is (trainers resumed from different checkpoints catch
    up in turn). All trainers must share batch_size, seed, device, precision and
    train_fraction, so that the data order, a function of (seed, epoch) and the
    train rows, is the one each would see alone.
    ``callback(trainer, step, loss)`` runs after every step of every trainer.
    """
    for t in trainers:
        t.evaluate_if_untrainable()
    todo = [t for t in trainers if not t.done]
    if not todo:
        return
    shared = {(t.cfg["batch_size"], t.cfg["seed"], t.cfg["device"], t.cfg["precision"],
               t.cfg.get("train_fraction", 1.0)) for t in todo}
    if len(shared) != 1:
        raise ConfigError("heads trained together must share batch_size, seed, device, precision and "
                          f"train_fraction; got {shared}")
    cfg = todo[0].cfg
    epoch = min(t.state["epoch"] for t in todo)
    while any(not t.done for t in todo):
        for i, (rows, features) in enumerate(cache.iter_batches("train", cfg["batch_size"], shuffle=True,
                                                                seed=cfg["seed"], epoch=epoch,
                                                                rows=todo[0].train_rows)):
            ready = [t for t in todo if not t.done and t.position == (epoch, i)]
            if not ready:
                if all(t.done or t.state["epoch"] > epoch for t in todo):
                    break  # every trainer is past this epoch
                continue  # consumed before the checkpoint these trainers resumed from
            x = features_to_tensor(features, todo[0].device, todo[0].x_dtype)
            for t in ready:
                loss = t.step(rows, x)
                if bar is not None:
                    bar.update(1)
                    name = f"{t.out_dir.name} " if len(todo) > 1 else ""
                    last = f", val {t.cfg['select_by']} {t.last_score:.4g}" if t.last_score is not None else ""
                    bar.set_postfix_str(f"{name}loss {loss:.4g}{last}", refresh=False)
                if callback is not None:
                    callback(t, t.state["step"], loss)
        for t in todo:
            t.end_epoch(epoch)
        epoch += 1
