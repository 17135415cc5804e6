"""Stage two commands: `geo fit-head`, `geo evaluate`, `geo sweep` (geo/heads) and `geo report` (geo/reports)."""

from __future__ import annotations

import click

from geo.cli import cli


# ---- stage two: fit-head, evaluate (geo/heads) ------------------------------


def _country_fn():
    """Predicted lat/lon -> country codes, for country accuracy (None if the lookup is unavailable)."""
    try:
        from geo.pipeline.countries import country_codes
    except ImportError:  # optional: the metrics are complete without it
        return None
    return country_codes


@cli.command("fit-head")
@click.argument("cache", type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.option("--head", default="mvmf", show_default=True, help="Output head: mvmf or softmax (any registered head).")
@click.option("--classes", "n_cells", default=1024, show_default=True, type=int,
              help="c: cells of the adaptive S2 partition (mixture components / classes).")
@click.option("--kappa0", default=16.0, show_default=True, type=float,
              help="MvMF initial log kappa (16 -> kappa = e^16, ~2.5 km half-mass radius).")
@click.option("--train-mu/--fixed-mu", default=True, show_default=True, help="MvMF: learn the component means.")
@click.option("--train-kappa/--fixed-kappa", default=True, show_default=True, help="MvMF: learn the concentrations.")
@click.option("--mu-init", type=click.Choice(["centre", "mean"]), default="centre", show_default=True,
              help="MvMF: initial means at the cell centres or the cells' training-point means.")
@click.option("--predict", type=click.Choice(["argmax", "mode", "centre", "mean"]), default=None,
              help="Prediction: mvmf argmax (default) | mode; softmax centre (default) | mean.")
@click.option("--batch-size", default=1024, show_default=True, type=int,
              help="Rows per step (use 8192+ on a GPU, with a larger --lr).")
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Peak learning rate (AdamW).")
@click.option("--epochs", default=10, show_default=True, type=int)
@click.option("--warmup-fraction", default=0.05, show_default=True, type=float,
              help="Fraction of steps of linear warm-up; cosine decay after.")
@click.option("--min-lr-fraction", default=0.01, show_default=True, type=float,
              help="The cosine decays to lr times this.")
@click.option("--weight-decay", default=0.0, show_default=True, type=float, help="Decoupled weight decay on W.")
@click.option("--eval-every", default=0, show_default=True, type=int,
              help="Steps between val evaluations and checkpoints; 0 = once per epoch.")
@click.option("--select-by", default="geoscore", show_default=True,
              help="Val metric selecting the model (geoscore, acc@750km, nll_nats, median_km ...).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help="auto (cuda, mps, cpu), cpu, cuda, cuda:1 ...")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True,
              help="Of the features x W product; vMF terms always run in float32 or float64.")
@click.option("--max-memory-mb", default=2048, show_default=True, type=int,
              help="Bound on the batch x classes temporaries; batches are chunked to fit.")
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
      geo fit-head cache.h5 --head mvmf --classes 8192 --kappa0 16 --out runs/mvmf-8k
      geo fit-head cache.h5 --head softmax --classes 8192 --out runs/softmax-8k
    """
    from geo.heads.evaluate import format_metrics
    from geo.heads.train import FitConfig, fit_head

    metrics = fit_head(cache, FitConfig(**options), out, overwrite=overwrite, progress=not quiet,
                       country_fn=_country_fn())
    click.echo(format_metrics(metrics))
    click.echo(f"wrote {out}/config.json, metrics.jsonl, checkpoint.pt, metrics.json, predictions.parquet")


@cli.command("evaluate")
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--cache", "cache_path", default=None, type=click.Path(exists=True, dir_okay=False, path_type=str),
              help="Evaluate on this cache instead of the run's own.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--predict", type=click.Choice(["argmax", "mode", "centre", "mean"]), default=None,
              help="Prediction mode (default: the run's).")
@click.option("--allow-other-provenance", is_flag=True,
              help="Accept a cache made by another backbone / weights / transform than the run's.")
@click.option("--device", default=None, help="auto, cpu, cuda ... (default auto).")
def evaluate_cmd(run, cache_path, split, predict, allow_other_provenance, device):
    """Score a trained run's selected model; write RUN/metrics.json and predictions.parquet.

    \b
    Example:
      geo evaluate runs/mvmf-8k
      geo evaluate runs/mvmf-8k --split val --predict mode
    """
    from geo.heads.evaluate import evaluate_run, format_metrics

    metrics = evaluate_run(run, cache_path=cache_path, split=split, predict=predict, device=device,
                           allow_other_provenance=allow_other_provenance, country_fn=_country_fn())
    click.echo(format_metrics(metrics))
    click.echo(f"wrote {run}/metrics.json and {run}/predictions.parquet")


# ---- sweep, report (geo/reports) --------------------------------------------


def _comma_list(kind):
    """A click callback turning "a,b,c" into [kind(a), kind(b), kind(c)]."""

    def parse(ctx, param, value):
        try:
            return [kind(v.strip()) for v in str(value).split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of {kind.__name__} values") from None

    return parse


@cli.command("sweep")
@click.argument("cache", type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.option("--head", "heads", default="mvmf,softmax", show_default=True, callback=_comma_list(str),
              help="Comma list of output heads.")
@click.option("--classes", default="16,64,256,1024,4096", show_default=True, callback=_comma_list(int),
              help="Comma list of c (cells of the adaptive S2 partition).")
@click.option("--kappa0", "kappa0s", default="8,12,16", show_default=True, callback=_comma_list(float),
              help="Comma list of MvMF initial log kappa (softmax has none: one run per c).")
@click.option("--lr", "lrs", default="0.001", show_default=True, callback=_comma_list(float),
              help="Peak learning rate, or a comma list of them (then run names end in -lrLR).")
@click.option("--epochs", default=10, show_default=True, type=int)
@click.option("--batch-size", default=1024, show_default=True, type=int)
@click.option("--train-mu/--fixed-mu", default=True, show_default=True, help="MvMF: learn the component means.")
@click.option("--train-kappa/--fixed-kappa", default=True, show_default=True, help="MvMF: learn the concentrations.")
@click.option("--mu-init", type=click.Choice(["centre", "mean"]), default="centre", show_default=True)
@click.option("--warmup-fraction", default=0.05, show_default=True, type=float)
@click.option("--min-lr-fraction", default=0.01, show_default=True, type=float)
@click.option("--weight-decay", default=0.0, show_default=True, type=float)
@click.option("--eval-every", default=0, show_default=True, type=int,
              help="Steps between val evaluations; 0 = once per epoch.")
@click.option("--select-by", default="geoscore", show_default=True, help="Val metric selecting each run's model.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help="auto (cuda, mps, cpu), cpu, cuda ...")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True)
@click.option("--max-memory-mb", default=None, type=click.IntRange(min=1),
              help="Memory for the heads trained together; more are trained in groups [default: half the free RAM].")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Sweep directory: one run directory per configuration, and sweep.json.")
@click.option("--overwrite", is_flag=True, help="Retrain every run from scratch, replacing other configurations.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def sweep_cmd(cache, heads, classes, kappa0s, lrs, max_memory_mb, out, overwrite, quiet, **options):
    """Train every head x classes x kappa0 (x lr) on one cache in one process; one run directory each.

    Each batch of features is read once and fed to every head; partitions are built
    once per c. Runs are written as OUT/<head>-c<C>[-k<K>] in the fit-head format
    (`geo fit-head` and `geo report` read them). Softmax gets one run per c. Rerunning
    the same command resumes: finished runs are kept, the others continue from their
    checkpoints. OUT/sweep.json records the grid and the groups heads were trained in.

    \b
    Example:
      geo sweep cache.h5 --head mvmf,softmax --classes 256,1024,4096 --kappa0 8,12,16 --out runs/sweep1
      geo sweep cache.h5 --head mvmf --classes 1024 --kappa0 16 --lr 1e-3,3e-3 --epochs 5 --out runs/lr
      geo report runs/sweep1 --out report/
    """
    from geo.heads.sweep import format_sweep_table, sweep
    from geo.heads.train import FitConfig

    base = FitConfig(lr=lrs[0] if len(lrs) == 1 else FitConfig.lr, **options)
    results = sweep(cache, out, heads=heads, classes=classes, kappa0s=kappa0s, lrs=lrs if len(lrs) != 1 else None,
                    base_config=base, overwrite=overwrite, progress=not quiet, country_fn=_country_fn(),
                    max_memory_mb=max_memory_mb)
    click.echo(format_sweep_table(results))
    click.echo(f"wrote {len(results)} runs under {out}/ (and {out}/sweep.json); compare them with "
               f"`geo report {out} --out REPORT_DIR`")


@cli.command("report")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Directory for the report.")
@click.option("--format", "fmt", type=click.Choice(["html", "md", "both"]), default="both", show_default=True,
              help="index.html, report.md, or both.")
@click.option("--allow-mixed-caches", is_flag=True,
              help="Report runs made on different feature caches side by side, labelled by cache.")
@click.option("--cache", "cache_path", type=click.Path(dir_okay=False), default=None,
              help="Feature cache for the density maps (default: the cache each run recorded).")
@click.option("--n-maps", type=click.IntRange(min=0), default=4, show_default=True,
              help="Test images on the density maps (half most, half least certain); 0 for no maps.")
def report_cmd(run_dirs, out_dir, fmt, allow_mixed_caches, cache_path, n_maps):
    """Compare runs: table, claims, plots and maps in OUT/index.html and OUT/report.md.

    RUN_DIRS are run directories written by `geo fit-head` or `geo sweep`, or
    directories holding them (searched two levels down). Directories that are
    incomplete, corrupt or of an unknown format are listed as skipped. Runs on
    different feature caches are refused unless --allow-mixed-caches. The table
    is also written as OUT/table.csv and OUT/table.parquet.

    \b
    Example:
        geo report runs/sweep1 runs/mvmf-big --out report/
        geo report runs/ --out report/ --format md --n-maps 0
    """
    from geo.reports.build import build_report  # lazy: keeps `geo --help` fast

    result = build_report(run_dirs, out_dir, fmt=fmt, allow_mixed_caches=allow_mixed_caches,
                          cache_path=cache_path, n_maps=n_maps)
    click.echo(f"{len(result.runs)} run(s) reported, {len(result.skipped)} skipped")
    for skipped in result.skipped:
        click.echo(f"  skipped {skipped.path}: {skipped.reason}")
    for note in result.notes:
        click.echo(f"  maps: {note}")
    for path in result.files:
        if path.suffix in (".html", ".md"):
            click.echo(f"wrote {path}")
