"""``FitConfig``, every option of training a head, and its resolution into a run's ``config.json``.

The dataclass is the one place an option is defined: its default, its help
text and its command-line form live in the field's metadata, and ``geo
fit-head`` and ``geo sweep`` generate their options from it
(``geo.cli.options``), so the library and the CLI cannot disagree.

``resolve_config`` makes every automatic choice (device, precision, the
head's default prediction mode, steps, chunking) and adds what the run was
built from (the cache's path, width and provenance). The head's own keyword
options come from the head class (``Head.options_from_config``) and are
stored as ``head_options``: how the run's head is rebuilt.

Model selection: the val GeoScore (mean 5000 exp(-d / 1492.7 km)) by default.
It rewards every scale at once and moves smoothly, where acc@750km is a step
function and val NLL is known to disagree with accuracy (paper fig. 3). The
rule is ``select_by`` and is recorded in ``config.json``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from geo.errors import ConfigError
from geo.metrics import DISTANCE_SCALES_KM, accuracy_key
from geo.sphere.s2cells import NUM_FACES
from geo.training.subsets import check_fraction, subset_size
from geo.version import __version__

# Metrics where smaller is better (for model selection); all others: larger is better.
LOWER_IS_BETTER = ("nll_nats", "median_km", "mean_km")
# How many predictions per row predictions.parquet keeps.
TOPK = 5
# Bytes per row and cell of the [b, c] float32 tensors one chunk keeps alive: logits, their
# gradient, the loss's log-softmax and its gradient (heads chunk their own larger temporaries).
# Chunks as large as possible: every chunk recasts W to bf16 and accumulates a full W gradient.
BYTES_PER_ROW_CELL = 16
# The range of kappa0 = log kappa the vMF numerics are tested for: kappa from 1e-6 to 1e9
# (tests/heads/test_mvmf_loss.py), i.e. log kappa in [-13.8, 20.7]. Outside it a head starts
# uniform (useless) or with a density that overflows at the first step.
KAPPA0_RANGE = (math.log(1e-6), math.log(1e9))
# Fewer optimizer steps than this in a whole run learn next to nothing (the case: 3 epochs
# of 6,000 rows at batch 1024 = 15 steps end no better than chance): fit-head and sweep warn up front.
MIN_USEFUL_STEPS = 100
# Queries per evaluation batch of a retrieval head: each batch is one pass over the gallery.
GALLERY_EVAL_BATCH = 16384


def _option(default, help: str, **cli):
    """A dataclass field with its command-line help (and click keywords: ``flag``, ``choices``)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class FitConfig:
    """Every option of ``fit_head``; defaults suit this project's 2-core CPU.

    On a GPU use a larger ``batch_size`` (8192-65536) and scale ``lr`` with it.
    """

    head: str = _option("mvmf", "Output head (any registered head: mvmf, softmax ...).")
    n_cells: int = _option(1024, "c: cells of the adaptive S2 partition (mixture components / classes).")
    kappa0: float = _option(16.0, "MvMF: initial log kappa (16 -> kappa = e^16, ~2.5 km half-mass radius); "
                                  "in [-13.8, 20.7], i.e. kappa from 1e-6 to 1e9, the range the numerics are tested for.")
    train_mu: bool = _option(True, "MvMF: learn the component means.", flag="--train-mu/--fixed-mu")
    train_kappa: bool = _option(True, "MvMF: learn the concentrations.", flag="--train-kappa/--fixed-kappa")
    mu_init: str = _option("centre", "MvMF: initial means at the cell centres or the cells' training-point means.",
                           choices=("centre", "mean"))
    mixture_components: int = _option(4, "vmf-mixture: K, the input-dependent vMF components (1-16).")
    knn_k: int = _option(16, "knn: neighbours retrieved from the train split (cosine similarity).")
    knn_index: str = _option("exact", "knn: search the gallery exactly (streamed from the cache) or through a "
                                      "FAISS index built once beside the cache (flat: exact, in memory; ivf, hnsw: "
                                      "approximate, 8-bit codes; needs the faiss extra).",
                             choices=("exact", "flat", "ivf", "hnsw"))
    knn_nprobe: int = _option(32, "knn --knn-index ivf: inverted lists searched per query (hnsw: efSearch / 4); "
                                  "more = higher recall, slower.")
    knn_rerank: int = _option(4, "knn --knn-index ivf|hnsw: the index proposes this many candidates per neighbour, "
                                 "re-scored exactly from the cache's features (1 = none: similarities from the "
                                 "8-bit codes).")
    hier_levels: int = _option(3, "softmax-hier: nested partitions trained jointly (c, ~c/4, ~c/16 ...; 1-4).")
    flow_width: int = _option(128, "flow: width of the field's residual AdaLN-MLP.")
    flow_depth: int = _option(3, "flow: residual blocks of the field's MLP.")
    flow_cond_dropout: float = _option(0.1, "flow: fraction of training rows given the null condition "
                                            "(for classifier-free guidance).")
    flow_guidance: float = _option(1.0, "flow: guidance scale w of v_null + w (v_cond - v_null); 1 = none.")
    flow_samples: int = _option(16, "flow: N of the best-of-N-by-density prediction (ODE solves per row).")
    flow_pairs: int = _option(2, "flow: training pairs (x0, t) drawn per row and step (the row's conditioning "
                                 "is computed once for all of them).")
    flow_time_power: float = _option(2.0, "flow: training times t = 1 - u^p, u uniform: p > 1 draws more of them "
                                          "near t = 1, where a city-sharp density is made (1 = uniform t).")
    trunk_depth: int = _option(0, "Residual MLP blocks in front of the head (mvmf, softmax, regression, vmf, "
                                   "vmf-mixture); 0 = the paper's head, linear in the features.")
    trunk_width: int = _option(512, "Width of that trunk (with --trunk-depth > 0).")
    label_smoothing_km: float = _option(0.0, "Softmax: haversine label smoothing tau in km (PIGEON's target "
                                             "exp(-(d(y, centre_j) - d(y, centre_true)) / tau)); 0 = cross-entropy.")
    predict: str | None = _option(None, "Prediction mode; default the head's first (mvmf: argmax | mode; "
                                        "softmax: centre | mean | argmax | mode).")
    batch_size: int = _option(1024, "Rows per step (use 8192+ on a GPU, with a larger --lr).")
    lr: float = _option(1e-3, "Peak learning rate (AdamW).")
    epochs: int = _option(10, "Passes over the train split.")
    train_fraction: float = _option(1.0, "Train on this fraction of the train split (a seeded random subset; "
                                         "subsets of one seed are nested); val and test stay whole.")
    warmup_fraction: float = _option(0.05, "Fraction of steps of linear warm-up; cosine decay after.")
    min_lr_fraction: float = _option(0.01, "The cosine decays to lr times this.")
    weight_decay: float = _option(0.0, "Decoupled weight decay on the matrices acting on features (W); 0 = Adam.")
    eval_every: int = _option(0, "Steps between val evaluations and checkpoints; 0 = once per epoch.")
    select_by: str = _option("geoscore", "Val metric selecting the model (geoscore, acc@750km, nll_nats, "
                                         "median_km ...).")
    seed: int = _option(0, "Seed of the head's initialisation and of the data order.")
    device: str = _option("auto", "auto (cuda, mps, cpu), cpu, cuda, cuda:1 ...")
    precision: str = _option("auto", "Of the features x W product (auto = bf16 where the device runs it "
                                      "natively); vMF terms always run in float32 or float64.",
                             choices=("auto", "bf16", "fp32"))
    max_memory_mb: int = _option(2048, "Bound on the batch x cells temporaries; batches are chunked to fit. "
                                       "knn: bound on the exact search's gallery blocks (streamed from the cache).")


def fit_config_fields() -> list[dataclasses.Field]:
    """The fields of ``FitConfig`` in order (what the CLI generates its options from)."""
    return list(dataclasses.fields(FitConfig))


def option_flag(name: str) -> str:
    """The command-line spelling of the ``FitConfig`` field ``name``: ``n_cells`` -> ``--n-cells``."""
    return "--" + name.replace("_", "-")


def selectable_metrics(has_density: bool) -> list[str]:
    """The val metrics ``select_by`` may name (``nll_nats`` only for heads with a density)."""
    names = [accuracy_key(x) for x in DISTANCE_SCALES_KM] + ["median_km", "mean_km", "geoscore"]
    return names + ["nll_nats"] if has_density else names


def check_options(config: FitConfig, *, n_train: int | None = None) -> None:
    """Refuse impossible values before anything is built or written, naming the option as typed (``--lr``).

    ``n_train`` (rows of the train split), when known, bounds ``--n-cells`` for heads over a partition.
    """
    from geo.heads import head_class  # here, not at the top: `geo --help` should not wait for torch

    def refuse(name: str, why: str):
        raise ConfigError(f"{option_flag(name)} {getattr(config, name)!r}: {why}")

    for name in ("kappa0", "lr", "warmup_fraction", "min_lr_fraction", "weight_decay", "label_smoothing_km"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            refuse(name, "must be a finite number")
    for name in ("n_cells", "batch_size", "epochs", "max_memory_mb", "mixture_components", "hier_levels", "knn_k",
                 "flow_width", "flow_depth", "flow_samples", "trunk_width", "knn_nprobe", "knn_rerank"):
        if getattr(config, name) < 1:
            refuse(name, "must be >= 1")
    if config.knn_index not in ("exact", "flat", "ivf", "hnsw"):
        refuse("knn_index", "choose one of: exact, flat, ivf, hnsw")
    if config.eval_every < 0:
        refuse("eval_every", "must be >= 0 (0 = once per epoch)")
    if config.lr <= 0:
        refuse("lr", "the learning rate must be > 0")
    if not 0 <= config.warmup_fraction < 1:
        refuse("warmup_fraction", "must be in [0, 1)")
    if not 0 <= config.min_lr_fraction <= 1:
        refuse("min_lr_fraction", "must be in [0, 1]")
    if config.weight_decay < 0:
        refuse("weight_decay", "must be >= 0 (0 = no decay)")
    if config.trunk_depth < 0:
        refuse("trunk_depth", "must be >= 0 (0 = no trunk)")
    if not 0 <= config.flow_cond_dropout < 1:
        refuse("flow_cond_dropout", "must be in [0, 1)")
    if not math.isfinite(config.flow_guidance):
        refuse("flow_guidance", "must be a finite number")
    if config.label_smoothing_km < 0:
        refuse("label_smoothing_km", "must be >= 0 (0 = plain cross-entropy)")
    low, high = KAPPA0_RANGE
    if not low <= config.kappa0 <= high:
        refuse("kappa0", f"must be in [{low:.1f}, {high:.1f}] (log kappa; kappa from 1e-6 to 1e9, "
                         "the range the vMF numerics are tested for)")
    check_fraction(config.train_fraction)
    if config.mu_init not in ("centre", "mean"):
        refuse("mu_init", "must be centre or mean")
    cls = head_class(config.head)
    known = selectable_metrics(cls.has_density)
    if config.select_by not in known:
        refuse("select_by", f"not a val metric of head {config.head!r}; choose one of: {', '.join(known)}")
    if cls.uses_partition and config.n_cells < NUM_FACES:
        refuse("n_cells", f"the partition starts from the {NUM_FACES} S2 faces, so it needs at least {NUM_FACES}")
    if cls.uses_partition and n_train is not None and config.n_cells > n_train:
        refuse("n_cells", f"more cells than the {n_train} rows of the train split; use at most {n_train}")


def few_steps_warning(resolved: dict) -> str | None:
    """A warning when a resolved config makes fewer than ``MIN_USEFUL_STEPS`` optimizer steps, else None."""
    steps = resolved["total_steps"]
    if steps >= MIN_USEFUL_STEPS or resolved.get("trainable") is False:
        return None
    return (f"only {steps} optimizer steps ({resolved['n_train']} train rows / --batch-size "
            f"{resolved['batch_size']} x --epochs {resolved['epochs']}); under {MIN_USEFUL_STEPS} steps a head "
            "learns next to nothing. Use a smaller --batch-size or more --epochs.")


# FitConfig fields added after the first run format (geo 0.1): a run directory written before
# them was trained with what is now their default.
_FIELDS_ADDED_SINCE_0_1 = ("train_fraction", "mixture_components", "knn_k", "hier_levels", "label_smoothing_km",
                          "flow_width", "flow_depth", "flow_cond_dropout", "flow_guidance", "flow_samples",
                          "trunk_depth", "trunk_width",
                          "knn_index", "knn_nprobe", "knn_rerank", "flow_pairs", "flow_time_power")
# ... and where a run made before them had another value than today's default.
# (flow_pairs and flow_time_power are not here although older flow runs trained with 1 and 1.0:
# every other head's run would then differ from today's config in two options it never reads. They
# only change training: an older flow run loads as it was trained, and one interrupted before they
# existed resumes its remaining steps with today's values.)
_OLDER_RUNS_HAD = {"knn_rerank": 1}  # approximate knn searches were not re-ranked


def implied_by_older_runs(resolved: dict) -> dict:
    """For the config.json keys an older run lacks, the value it implicitly had (``runs.check_run_dir``).

    Added options had their defaults; the derived keys of ``--train-fraction`` follow from
    keys that are compared anyway (``n_train``, ``seed``).
    """
    defaults = {f.name: f.default for f in fit_config_fields() if f.name in _FIELDS_ADDED_SINCE_0_1}
    defaults.update(_OLDER_RUNS_HAD)
    return {**defaults, "trainable": resolved.get("trainable"), "n_train_split": resolved.get("n_train_split"),
            "train_subset_seed": resolved.get("train_subset_seed")}


def resolve_config(config: FitConfig, cache, cache_path: Path, n_train: int, n_val: int) -> dict:
    """``config`` with every automatic choice made, plus what the run was built from (config.json).

    ``n_train`` and ``n_val`` are the rows of the cache's train and val splits. A run on a
    ``train_fraction`` of the train split records the rows it trains on as ``n_train``, the
    split's rows as ``n_train_split`` and the seed that drew the subset as ``train_subset_seed``
    (``geo.training.subsets``).
    """
    # Imported here, not at the top: the CLI reads FitConfig to build its options, and
    # `geo --help` should not wait for torch.
    from geo.devices import resolve_device, resolve_precision
    from geo.heads import head_class
    from geo.training import runs

    cls = head_class(config.head)
    predict = cls.check_predict(config.predict)
    check_options(config, n_train=n_train)
    device = resolve_device(config.device)
    # Retrieval compares features by cosine: bf16 queries (8-bit mantissas) would change the neighbours.
    precision = "fp32" if cls.needs_gallery and config.precision == "auto" else resolve_precision(config.precision,
                                                                                                  device)
    n_train_split, n_train = n_train, subset_size(n_train, config.train_fraction)
    steps_per_epoch = -(-n_train // config.batch_size)
    # A head with nothing to train (retrieval) is evaluated once: no epochs, no steps.
    epochs = config.epochs if cls.trainable else 0
    total_steps = steps_per_epoch * epochs
    chunk_rows = max(1, min(config.batch_size, config.max_memory_mb * 2**20 // (config.n_cells * BYTES_PER_ROW_CELL)))
    # Retrieval reads the whole gallery once per evaluation batch: large batches, few passes
    # (its memory is bounded per gallery block, not per batch x cells).
    eval_batch_size = max(chunk_rows, GALLERY_EVAL_BATCH) if cls.needs_gallery else chunk_rows
    resolved = dataclasses.asdict(config)
    resolved.update(
        format=runs.RUN_FORMAT, geo_version=__version__, predict=predict, device=str(device), precision=precision,
        eval_every=config.eval_every or steps_per_epoch, select_mode="min" if config.select_by in LOWER_IS_BETTER
        else "max", optimizer="adamw", lr_schedule="linear-warmup-cosine",
        warmup_steps=int(round(config.warmup_fraction * total_steps)), steps_per_epoch=steps_per_epoch,
        total_steps=total_steps, chunk_rows=chunk_rows, eval_batch_size=eval_batch_size, topk=TOPK,
        epochs=epochs, trainable=cls.trainable,
        train_fraction=float(config.train_fraction), n_train=n_train, n_train_split=n_train_split, train_subset_seed=config.seed, n_val=n_val,
        cache_path=str(Path(cache_path).resolve()),
        cache_feature_dim=cache.feature_dim, cache_n_rows=cache.n_rows, cache_provenance=cache.provenance,
        # only an approximate index's candidates are re-scored: 1 (none) for exact search and flat
        knn_rerank=config.knn_rerank if config.knn_index in ("ivf", "hnsw") else 1,
    )
    if cls.needs_gallery:  # which cache, which rows and its content hash: the gallery is read, never copied
        from geo.training.gallery import gallery_record
        resolved["gallery"] = gallery_record(cache, cache_path, config.train_fraction, config.seed)
    resolved["head_options"] = cls.options_from_config(resolved)
    return runs.json_safe(resolved)
