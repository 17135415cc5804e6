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
from dataclasses import dataclass, field
from pathlib import Path

from geo.version import __version__
from geo.errors import ConfigError

# Metrics where smaller is better (for model selection); all others: larger is better.
LOWER_IS_BETTER = ("nll_nats", "median_km", "mean_km")
# How many predictions per row predictions.parquet keeps.
TOPK = 5
# Bytes per row and cell of the [b, c] float32 tensors one chunk keeps alive: logits, their
# gradient, the loss's log-softmax and its gradient (heads chunk their own larger temporaries).
# Chunks as large as possible: every chunk recasts W to bf16 and accumulates a full W gradient.
BYTES_PER_ROW_CELL = 16


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
    kappa0: float = _option(16.0, "MvMF: initial log kappa (16 -> kappa = e^16, ~2.5 km half-mass radius).")
    train_mu: bool = _option(True, "MvMF: learn the component means.", flag="--train-mu/--fixed-mu")
    train_kappa: bool = _option(True, "MvMF: learn the concentrations.", flag="--train-kappa/--fixed-kappa")
    mu_init: str = _option("centre", "MvMF: initial means at the cell centres or the cells' training-point means.",
                           choices=("centre", "mean"))
    mixture_components: int = _option(4, "vmf-mixture: K, the input-dependent vMF components (1-16).")
    knn_k: int = _option(16, "knn: neighbours retrieved from the train split (cosine similarity).")
    hier_levels: int = _option(3, "softmax-hier: nested partitions trained jointly (c, ~c/4, ~c/16 ...; 1-4).")
    label_smoothing_km: float = _option(0.0, "Softmax: haversine label smoothing tau in km (PIGEON's target "
                                             "exp(-(d(y, centre_j) - d(y, centre_true)) / tau)); 0 = cross-entropy.")
    predict: str | None = _option(None, "Prediction mode; default the head's first (mvmf: argmax | mode; "
                                        "softmax: centre | mean | argmax | mode).")
    batch_size: int = _option(1024, "Rows per step (use 8192+ on a GPU, with a larger --lr).")
    lr: float = _option(1e-3, "Peak learning rate (AdamW).")
    epochs: int = _option(10, "Passes over the train split.")
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
    max_memory_mb: int = _option(2048, "Bound on the batch x cells temporaries; batches are chunked to fit.")


def fit_config_fields() -> list[dataclasses.Field]:
    """The fields of ``FitConfig`` in order (what the CLI generates its options from)."""
    return list(dataclasses.fields(FitConfig))


def check_options(config: FitConfig) -> None:
    """Refuse impossible values, naming the option, before anything is built or written."""
    for name in ("n_cells", "batch_size", "epochs", "max_memory_mb", "mixture_components", "hier_levels", "knn_k"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be >= 1, not {getattr(config, name)}")
    if config.eval_every < 0 or config.lr <= 0 or not 0 <= config.warmup_fraction < 1:
        raise ConfigError("eval_every must be >= 0, lr > 0 and warmup_fraction in [0, 1)")
    if not 0 <= config.label_smoothing_km < float("inf"):
        raise ConfigError(f"--label-smoothing-km must be a finite number >= 0, not {config.label_smoothing_km}")
    if config.mu_init not in ("centre", "mean"):
        raise ConfigError(f"--mu-init must be centre or mean, not {config.mu_init!r}")


def resolve_config(config: FitConfig, cache, cache_path: Path, n_train: int, n_val: int) -> dict:
    """``config`` with every automatic choice made, plus what the run was built from (config.json)."""
    # Imported here, not at the top: the CLI reads FitConfig to build its options, and
    # `geo --help` should not wait for torch.
    from geo.devices import resolve_device, resolve_precision
    from geo.heads import head_class
    from geo.training import runs

    cls = head_class(config.head)
    predict = cls.check_predict(config.predict)
    check_options(config)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    steps_per_epoch = -(-n_train // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    chunk_rows = max(1, min(config.batch_size, config.max_memory_mb * 2**20 // (config.n_cells * BYTES_PER_ROW_CELL)))
    resolved = dataclasses.asdict(config)
    resolved.update(
        format=runs.RUN_FORMAT, geo_version=__version__, predict=predict, device=str(device), precision=precision,
        eval_every=config.eval_every or steps_per_epoch, select_mode="min" if config.select_by in LOWER_IS_BETTER
        else "max", optimizer="adamw", lr_schedule="linear-warmup-cosine",
        warmup_steps=int(round(config.warmup_fraction * total_steps)), steps_per_epoch=steps_per_epoch,
        total_steps=total_steps, chunk_rows=chunk_rows, eval_batch_size=chunk_rows, topk=TOPK,
        n_train=n_train, n_val=n_val, cache_path=str(Path(cache_path).resolve()),
        cache_feature_dim=cache.feature_dim, cache_n_rows=cache.n_rows, cache_provenance=cache.provenance,
    )
    resolved["head_options"] = cls.options_from_config(resolved)
    return runs.json_safe(resolved)
