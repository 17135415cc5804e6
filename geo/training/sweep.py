"""``sweep``: train a grid of heads (head x c x kappa0 [x lr] [x train fraction]) on one cache in one process.

Every configuration gets its own run directory ``OUT/<head>-c<C>[-k<K>][-lr<LR>][-f<F>]``
(c is the paper's symbol for ``n_cells``; ``-k`` is the tag MvMF declares for kappa0;
``-f`` appears when the sweep varies ``train_fraction``, for learning curves)
in exactly the ``fit-head`` format, with the ``config.json`` that ``fit_head``
writes for that configuration: ``geo fit-head`` on such a directory resumes or
recognises it, and ``geo report OUT`` reads the whole sweep. ``OUT/sweep.json``
records the resolved grid, the runs and the groups they were trained in.

What the sweep shares (and ``fit_head`` one at a time cannot): the process,
the cache (opened and validated once, the train split loaded once), one
partition per c (used by every head with that c), and each batch of features,
read and converted to a tensor once and fed to every head of a group
(``geo.training.trainer.train_together``). Each head keeps its own optimizer and
RNG state and is seeded as ``fit_head`` seeds it, so its weights and metrics
are those ``fit_head`` gives with the same seed.

Grid rules: a head varies only the options it declares in ``Head.sweep_options``
(MvMF: kappa0). Softmax declares none, so it gets one run per c (and lr), not
one per kappa0; its config keeps the base kappa0, as ``fit-head`` would. The base config's batch_size, epochs, seed, device and
precision hold for every run, so every head sees the same batches.

Learning curves: with several ``train_fractions`` every configuration is trained
on each fraction of the train split (nested subsets: ``geo.training.subsets``).
Heads on different subsets see different batches, so the heads of one fraction
form their own groups (and get partitions built from that subset's locations);
within a fraction, each batch is still read once and fed to every head.

Memory: heads are trained together while their estimated memory (weights,
gradient, two AdamW moments and the best-so-far copy per head, plus the
largest ``[chunk, c]`` temporaries, which live one head at a time) fits
``max_memory_mb``; otherwise they are split into groups trained one after
another (first-fit, largest heads first). A head too large on its own gets a
group of its own.

Resumption: a run whose ``metrics.json`` exists (with the same configuration)
is finished and never retrained; the others resume from their checkpoints.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import warnings
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from geo.cache.store import FeatureCache
from geo.errors import ConfigError
from geo.geometry import latlon_to_xyz
from geo.heads import head_class
from geo.sphere.partition import Partition
from geo.training import runs
from geo.training.config import (BYTES_PER_ROW_CELL, FitConfig, few_steps_warning, implied_by_older_runs,
                                 resolve_config)
from geo.training.evaluate import CountryFn
from geo.training.subsets import check_fraction
from geo.training.trainer import HeadTrainer, split_rows, train_rows, train_together

SWEEP_FILE = "sweep.json"
SWEEP_FORMAT = "geo-sweep/1"
_COPIES_PER_PARAMETER = 5  # float32 weights, gradient, two AdamW moments, the best-so-far copy


def run_name(head: str, n_cells: int, varied: dict[str, float] | None = None, lr: float | None = None,
             train_fraction: float | None = None) -> str:
    """``mvmf-c1024-k16``, ``softmax-c64``; ``-lr0.001`` appended when the sweep varies lr, then
    ``-f0.1`` when it varies the train fraction.

    ``varied`` holds the values of the options the head declares in ``sweep_options``,
    each written with the head's tag for it.
    """
    name = f"{head}-c{n_cells}"
    tags = head_class(head).sweep_options
    for option, value in (varied or {}).items():
        name += f"-{tags[option]}{value:g}"
    if lr is not None:
        name += f"-lr{lr:g}"
    if train_fraction is not None:
        name += f"-f{train_fraction:g}"
    return name


def _unique(values: Iterable, option: str, kind=None) -> list:
    out = []
    for value in values:
        if kind is not None:
            try:
                value = kind(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{option}: {value!r} is not a {kind.__name__}") from None
        if value not in out:
            out.append(value)
    return out


def sweep_grid(heads: Sequence[str], n_cells: Sequence[int], kappa0s: Sequence[float], base: FitConfig,
               lrs: Sequence[float] | None = None, train_fractions: Sequence[float] | None = None
               ) -> list[tuple[str, FitConfig]]:
    """The runs of a sweep as ``(name, FitConfig)`` in grid order: head, c, kappa0, lr, then train fraction.

    kappa0 is the one option a head may declare as swept today (``Head.sweep_options``);
    heads that do not declare it get one run per (c, lr) with the base kappa0.
    """
    heads = _unique(heads, "--head")
    n_cells = _unique(n_cells, "--n-cells", int)
    varied_values = {"kappa0": _unique(kappa0s, "--kappa0", float)}
    lrs = _unique(lrs if lrs is not None else [base.lr], "--lr", float)
    fractions = _unique(train_fractions if train_fractions is not None else [base.train_fraction],
                        "--train-fraction", float)
    for fraction in fractions:
        check_fraction(fraction)
    for option, values in (("--head", heads), ("--n-cells", n_cells), ("--lr", lrs),
                           ("--train-fraction", fractions)):
        if not values:
            raise ConfigError(f"{option}: the list is empty; give at least one value")
    head_classes = {head: head_class(head) for head in heads}  # unknown heads: ConfigError naming the known ones
    for option, values in varied_values.items():
        users = [h for h, cls in head_classes.items() if option in cls.sweep_options]
        if not values and users:
            raise ConfigError(f"--{option}: the list is empty; heads {', '.join(users)} need at least one value")
    grid = []
    for head, cls in head_classes.items():
        options = [o for o in varied_values if o in cls.sweep_options]
        combos = [dict(zip(options, values)) for values in itertools.product(*(varied_values[o] for o in options))]
        for c in n_cells:
            for varied in combos:
                for lr, fraction in itertools.product(lrs, fractions):
                    config = dataclasses.replace(base, head=head, n_cells=c, lr=lr, train_fraction=fraction,
                                                 **varied)
                    name = run_name(head, c, varied, lr if len(lrs) > 1 else None,
                                    fraction if len(fractions) > 1 else None)
                    if base.trunk_depth > 0 and "trunk_depth" in head_class(head).__init__.__code__.co_varnames:
                        name += f"-deep{base.trunk_depth}x{base.trunk_width}"  # the optional trunk
                    grid.append((name, config))
    return grid


def estimate_memory_bytes(config: dict, feature_dim: int) -> tuple[int, int]:
    """(persistent, temporary) bytes of training the head of a resolved ``config``.

    Persistent: ``_COPIES_PER_PARAMETER`` float32 copies of the head's parameters
    (``Head.parameter_count``: W [c, d], b [c], and for MvMF mu [c, 3], log kappa [c]),
    plus W's bf16 copy under bf16 precision.
    Temporary: the ``[chunk_rows, c]`` tensors of one training chunk.
    """
    c, d = config["n_cells"], feature_dim
    n_params = head_class(config["head"]).parameter_count(d, c)
    persistent = 4 * n_params * _COPIES_PER_PARAMETER + (2 * c * d if config["precision"] == "bf16" else 0)
    return persistent, config["chunk_rows"] * c * BYTES_PER_ROW_CELL


def schedule_groups(sizes: dict[str, tuple[int, int]], budget_bytes: int) -> list[list[str]]:
    """Split runs into groups whose persistent sum + largest temporary fits ``budget_bytes``.

    ``sizes`` maps run name -> (persistent, temporary) bytes, in grid order. First
    fit, largest runs first; each group lists its runs in grid order.
    """
    order = list(sizes)
    groups: list[list[str]] = []
    for name in sorted(order, key=lambda n: -sum(sizes[n])):
        persistent, temporary = sizes[name]
        for group in groups:
            if (sum(sizes[n][0] for n in group) + persistent
                    + max(temporary, *(sizes[n][1] for n in group)) <= budget_bytes):
                group.append(name)
                break
        else:
            groups.append([name])
    return [sorted(group, key=order.index) for group in groups]


def default_budget_mb() -> int:
    """Half the memory available now (4 GiB if the OS does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**21
    except (ValueError, OSError, AttributeError):
        return 4096


def sweep(
    cache_path: str | Path,
    out_dir: str | Path,
    *,
    heads: Sequence[str] = ("mvmf", "softmax"),
    n_cells: Sequence[int] = (16, 64, 256, 1024, 4096),
    kappa0s: Sequence[float] = (8.0, 12.0, 16.0),
    lrs: Sequence[float] | None = None,
    train_fractions: Sequence[float] | None = None,
    base_config: FitConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
    country_fn: CountryFn | None = None,
    max_memory_mb: float | None = None,
    callback: Callable[[str, int, float], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> dict[str, dict]:
    """Train every (head, c, kappa0, lr, train fraction) of the grid on the cache at ``cache_path``; runs go to
    ``out_dir/NAME``.

    Args:
        heads, n_cells, kappa0s: the grid (duplicates dropped); kappa0 applies to heads that sweep it (MvMF).
        lrs: peak learning rates to sweep; None = ``base_config.lr`` only (and no ``-lr`` in names).
        train_fractions: fractions of the train split to train every configuration on (learning
            curves; nested subsets); None = ``base_config.train_fraction`` only (and no ``-f`` in names).
        base_config: every other option (``FitConfig``; its head, n_cells, kappa0, lr and
            train_fraction are replaced).
        overwrite: retrain every run from scratch, replacing directories holding other configurations;
            without it such a directory raises ``ConfigError`` before anything is trained.
        country_fn: predicted (lat_deg, lon_deg) -> ISO codes, for the final country accuracy.
        max_memory_mb: memory for the heads trained together (default: half the available RAM).
        callback: ``callback(run_name, step, loss)`` after every step of every head (tests use it).
        warn: called with a message when the options look unwise (too few optimizer steps);
            None = ``warnings.warn``.
    Returns:
        ``{run name: final metrics}`` (``metrics.json`` of every run, in grid order).
    """
    base = base_config or FitConfig()
    grid = sweep_grid(heads, n_cells, kappa0s, base, lrs, train_fractions)
    grid_record = {"heads": list(heads), "n_cells": list(n_cells), "kappa0s": list(kappa0s),
                   "lrs": list(lrs) if lrs is not None else [base.lr],
                   "train_fractions": list(train_fractions) if train_fractions is not None else [base.train_fraction]}
    budget_mb = default_budget_mb() if max_memory_mb is None else max_memory_mb
    if not budget_mb > 0:
        raise ConfigError(f"--max-memory-mb must be > 0, not {budget_mb}")
    out_dir = Path(out_dir)
    with FeatureCache(cache_path) as cache:
        rows = split_rows(cache)
        n_train = len(rows["train"])
        configs = {name: resolve_config(config, cache, Path(cache_path), n_train, len(rows["val"]))
                   for name, config in grid}
        # Runs share batch size and epochs; their step counts differ only by train fraction: one warning at most.
        message = next(filter(None, map(few_steps_warning, configs.values())), None)
        if message:
            (warn or warnings.warn)(message)
        # Partitions once per (train fraction, c), from the rows that fraction trains on, before
        # any directory is touched: an impossible c fails early.
        partitions = {}
        for fraction, c in sorted({(config["train_fraction"], config["n_cells"]) for config in configs.values()
                                   if head_class(config["head"]).uses_partition}):
            train = train_rows(cache, {"train_fraction": fraction, "seed": base.seed})
            try:
                partitions[fraction, c] = Partition.build(cache.lat_deg[train], cache.lon_deg[train], c)
            except ConfigError as err:
                with_fraction = f" with --train-fraction {fraction:g}" if fraction != 1 else ""
                raise ConfigError(f"--n-cells {c}{with_fraction}: {err}") from None
        # Directories holding other configurations are refused here, before anything is trained.
        resume = {name: runs.check_run_dir(out_dir / name, config, overwrite=overwrite,
                                           implied=implied_by_older_runs(config))
                  for name, config in configs.items()}
        finished = {name for name in configs if (out_dir / name / runs.METRICS_FILE).exists()}
        sizes = {name: estimate_memory_bytes(config, cache.feature_dim) for name, config in configs.items()}
        # Heads on different train subsets see different batches: groups never mix fractions.
        groups = [group for fraction in dict.fromkeys(config["train_fraction"] for config in configs.values())
                  for group in schedule_groups({n: s for n, s in sizes.items() if n not in finished
                                                and configs[n]["train_fraction"] == fraction},
                                               int(budget_mb * 2**20))]
        _write_sweep_json(out_dir, cache_path, grid_record, base, budget_mb, configs, sizes, groups, finished)

        target_xyz = torch.from_numpy(latlon_to_xyz(cache.lat_deg, cache.lon_deg).astype("float32"))
        total = sum(config["total_steps"] for config in configs.values())
        done_steps = sum(configs[n]["total_steps"] for n in finished)
        for name in resume:
            if resume[name] and name not in finished:
                done_steps += int(runs.load_checkpoint(out_dir / name / runs.CHECKPOINT_FILE)["step"])
        bar = tqdm(total=total, initial=done_steps, disable=not progress, unit="step", dynamic_ncols=True,
                   desc=f"sweep {len(configs)} heads")
        for i, group in enumerate(groups):
            bar.set_description_str(f"sweep {len(configs)} heads, group {i + 1}/{len(groups)}", refresh=False)
            trainers = [HeadTrainer(cache, configs[name], out_dir / name, resume=resume[name],
                                    partition=partitions.get((configs[name]["train_fraction"],
                                                              configs[name]["n_cells"])),
                                    target_xyz=target_xyz)
                        for name in group]
            train_together(cache, trainers, bar=bar, callback=None if callback is None else
                           lambda t, step, loss: callback(t.out_dir.name, step, loss))
            for trainer in trainers:
                trainer.finish(country_fn=country_fn)
            del trainers, trainer  # free this group's weights and moments before the next group's
        bar.close()
        _write_sweep_json(out_dir, cache_path, grid_record, base, budget_mb, configs, sizes, groups, set(configs))
    return {name: runs.read_json(out_dir / name / runs.METRICS_FILE) for name in configs}


def _write_sweep_json(out_dir: Path, cache_path, grid: dict, base: FitConfig, budget_mb: float,
                      configs: dict, sizes: dict, groups: list[list[str]], finished: set[str]) -> None:
    mb = 2**20
    runs.write_json(out_dir / SWEEP_FILE, runs.json_safe({
        "format": SWEEP_FORMAT,
        "cache_path": str(Path(cache_path).resolve()),
        "grid": grid,
        "base_config": {k: v for k, v in dataclasses.asdict(base).items()  # the grid sets the others
                        if k not in ("head", "n_cells", "kappa0", "lr", "train_fraction")},
        "max_memory_mb": budget_mb,
        "runs": [{"name": name, "dir": name, "head": config["head"], "n_cells": config["n_cells"],
                  "kappa0": config["kappa0"] if "kappa0" in head_class(config["head"]).sweep_options else None, "lr": config["lr"],
                  "train_fraction": config["train_fraction"], "n_train": config["n_train"],
                  "total_steps": config["total_steps"], "estimated_mb": round(sum(sizes[name]) / mb, 1),
                  "status": "finished" if name in finished else "to train"} for name, config in configs.items()],
        "groups": [{"runs": group, "estimated_mb": round((sum(sizes[n][0] for n in group)
                                                          + max(sizes[n][1] for n in group)) / mb, 1),
                    "over_budget": (sum(sizes[n][0] for n in group) + max(sizes[n][1] for n in group))
                    > budget_mb * mb} for group in groups],
    }))


def format_sweep_table(results: dict[str, dict]) -> str:
    """One line per run: accuracies at 1/25/200/750/2500 km (%), median km, GeoScore, NLL (nats)."""
    keys = ["acc@1km", "acc@25km", "acc@200km", "acc@750km", "acc@2500km"]
    width = max([len("run"), *map(len, results)])
    lines = [f"{'run':<{width}}  {'@1km':>6} {'@25km':>6} {'@200km':>6} {'@750km':>6} {'@2500km':>7}"
             f" {'median km':>10} {'GeoScore':>8} {'NLL':>7}"]
    for name, m in results.items():
        acc = " ".join(f"{100 * m[k]:{w}.1f}" if m.get(k) is not None else f"{'-':>{w}}"
                       for k, w in zip(keys, (6, 6, 6, 6, 7)))
        nll = f"{m['nll_nats']:7.2f}" if m.get("nll_nats") is not None else f"{'-':>7}"
        lines.append(f"{name:<{width}}  {acc} {m.get('median_km', float('nan')):10.1f}"
                     f" {m.get('geoscore', float('nan')):8.1f} {nll}")
    split = next(iter(results.values()), {}).get("split", "test")
    return "\n".join([f"{split} split, accuracies in %:", *lines])
