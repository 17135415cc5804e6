"""Stage two commands: `geo fit-head`, `geo evaluate` and `geo sweep` (geo/training)."""

from __future__ import annotations

from pathlib import Path

import click

from geo.cli.group import cli
from geo.cli.options import comma_list, fit_field, fit_options


# ---- stage two: fit-head, evaluate, sweep (geo/training) --------------------


def _country_fn():
    """Predicted lat/lon -> country codes, for country accuracy (None if the lookup is unavailable)."""
    try:
        from geo.pipeline.countries import country_codes
    except ImportError:  # optional: the metrics are complete without it
        return None
    return country_codes


def _warn(message: str) -> None:
    click.echo(f"Warning: {message}", err=True)


@cli.command("fit-head")
@click.argument("cache", type=click.Path(exists=True, dir_okay=False, path_type=str))
@fit_options()
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Run directory (resumed if it holds the same configuration).")
@click.option("--overwrite", is_flag=True, help="Replace a run directory holding another configuration.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def fit_head_cmd(cache, out, overwrite, quiet, **options):
    """Train an output head on a feature cache; select on val; score on test.

    Writes OUT/config.json (every option), metrics.jsonl (one line per val
    evaluation), checkpoint.pt, and for the selected model metrics.json and
    predictions.parquet. Rerunning the same command resumes an interrupted run.

    \b
    Example:
      geo fit-head cache.h5 --head mvmf --n-cells 8192 --kappa0 16 --out runs/mvmf-8k
      geo fit-head cache.h5 --head softmax --n-cells 8192 --out runs/softmax-8k
    """
    from geo.training.config import FitConfig
    from geo.training.evaluate import format_metrics
    from geo.training.fit import fit_head

    metrics = fit_head(cache, FitConfig(**options), out, overwrite=overwrite, progress=not quiet,
                       country_fn=_country_fn(), warn=_warn)
    click.echo(format_metrics(metrics))
    click.echo(f"wrote {out}/config.json, metrics.jsonl, checkpoint.pt, metrics.json, predictions.parquet")


@cli.command("evaluate")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--cache", "cache_path", default=None, type=click.Path(exists=True, dir_okay=False, path_type=str),
              help="Evaluate on this cache instead of the run's own.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--name", default=None,
              help="Evaluation name: writes RUN/eval/NAME/ [default: the cache's stem, + -SPLIT if not test].")
@click.option("--predict", default=None, help="Prediction mode, one the run's head offers (default: the run's).")
@click.option("--allow-other-provenance", is_flag=True,
              help="Accept a cache made by another backbone / weights / transform than the run's.")
@click.option("--device", default=None, help="auto, cpu, cuda ... (default auto).")
@click.option("--quiet", is_flag=True, help="One line per run instead of its metrics, and no progress bar.")
def evaluate_cmd(runs, cache_path, split, name, predict, allow_other_provenance, device, quiet):
    """Score trained runs' selected models on a test set; write RUN/eval/NAME/ for each RUN.

    RUN/eval/NAME/ gets metrics.json and predictions.parquet; the run's own files
    are never modified. A test set extracted with `geo extract TEST --like TRAIN_CACHE`
    shares the training cache's features (only the manifest differs) and is accepted
    as is. `geo report` shows every evaluation of every run, one table per test set.
    Several RUNs are evaluated in one process, one after the other (an error stops at
    that run; the evaluations already written stay).

    \b
    Example:
      geo evaluate runs/mvmf-8k --cache im2gps3k.h5          # -> runs/mvmf-8k/eval/im2gps3k/
      geo evaluate runs/*/ --cache im2gps3k.h5 --quiet       # every run of a sweep
      geo evaluate runs/mvmf-8k --split val --predict mode --name val-mode
    """
    from geo.training.evaluate import evaluate_run, format_metrics

    not_runs = [run for run in runs if not (Path(run) / "config.json").is_file()]
    if not_runs:  # refused before any evaluation is written
        raise click.BadParameter(f"{', '.join(not_runs)}: not a run directory (no config.json); "
                                 "pass folders written by geo fit-head or geo sweep", param_hint="RUNS")
    country_fn = _country_fn()
    for run in runs:
        metrics = evaluate_run(run, cache_path=cache_path, split=split, name=name, predict=predict, device=device,
                               allow_other_provenance=allow_other_provenance, country_fn=country_fn,
                               progress=not quiet)
        if not quiet:
            click.echo(format_metrics(metrics))
        click.echo(f"wrote {metrics['eval_dir']}/metrics.json and predictions.parquet")


@cli.command("sweep")
@click.argument("cache", type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.option("--head", "heads", default="mvmf,softmax", show_default=True, callback=comma_list(str),
              help="Comma list of output heads.")
@click.option("--n-cells", "--classes", "n_cells_list", default="16,64,256,1024,4096", show_default=True,
              callback=comma_list(int), help="Comma list of c (cells of the adaptive S2 partition).")
@click.option("--kappa0", "kappa0s", default="8,12,16", show_default=True, callback=comma_list(float),
              help="Comma list of MvMF initial log kappa (heads that do not sweep it get one run per c).")
@click.option("--lr", "lrs", default=str(fit_field("lr").default), show_default=True, callback=comma_list(float),
              help="Peak learning rate, or a comma list of them (then run names end in -lrLR).")
@click.option("--train-fraction", "train_fractions", default=str(fit_field("train_fraction").default),
              show_default=True, callback=comma_list(float),
              help="Fraction of the train split, or a comma list of them for learning curves: every head is "
                   "trained on each (nested random subsets; run names end in -fF).")
@fit_options(skip=("head", "n_cells", "kappa0", "lr", "train_fraction", "max_memory_mb"))
@click.option("--max-memory-mb", default=None, type=click.IntRange(min=1),
              help="Memory for the heads trained together; more are trained in groups [default: half the free RAM].")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Sweep directory: one run directory per configuration, and sweep.json.")
@click.option("--overwrite", is_flag=True, help="Retrain every run from scratch, replacing other configurations.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def sweep_cmd(cache, heads, n_cells_list, kappa0s, lrs, train_fractions, max_memory_mb, out, overwrite, quiet,
              **options):
    """Train every head x classes x kappa0 (x lr x train fraction) on one cache in one process; one run each.

    Each batch of features is read once and fed to every head; partitions are built
    once per c. Runs are written as OUT/<head>-c<C>[-k<K>] in the fit-head format
    (`geo fit-head` and `geo report` read them). Softmax gets one run per c. Rerunning
    the same command resumes: finished runs are kept, the others continue from their
    checkpoints. OUT/sweep.json records the grid and the groups heads were trained in.

    \b
    Example:
      geo sweep cache.h5 --head mvmf,softmax --n-cells 256,1024,4096 --kappa0 8,12,16 --out runs/sweep1
      geo sweep cache.h5 --head mvmf --n-cells 1024 --kappa0 16 --lr 1e-3,3e-3 --epochs 5 --out runs/lr
      geo sweep cache.h5 --head mvmf,softmax --n-cells 1024 --train-fraction 0.1,0.3,1 --out runs/curves
      geo report runs/sweep1 --out report/
    """
    from geo.training.config import FitConfig
    from geo.training.sweep import format_sweep_table, sweep

    base = FitConfig(lr=lrs[0] if len(lrs) == 1 else FitConfig.lr,
                     train_fraction=train_fractions[0] if len(train_fractions) == 1 else FitConfig.train_fraction,
                     **options)
    results = sweep(cache, out, heads=heads, n_cells=n_cells_list, kappa0s=kappa0s, lrs=lrs if len(lrs) != 1 else None,
                    train_fractions=train_fractions if len(train_fractions) != 1 else None, base_config=base,
                    overwrite=overwrite, progress=not quiet, country_fn=_country_fn(),
                    max_memory_mb=max_memory_mb, warn=_warn)
    click.echo(format_sweep_table(results))
    click.echo(f"wrote {len(results)} runs under {out}/ (and {out}/sweep.json); compare them with "
               f"`geo report {out} --out REPORT_DIR`")
