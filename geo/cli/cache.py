"""`geo cache ...`: inspect feature caches (geo/cache)."""

from __future__ import annotations

import click

from geo.cli.group import cli


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


@cache_group.command("import")
@click.argument("source", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="HDF5 feature cache to write (OUT.partial until complete; rerun to resume).")
@click.option("--backbone", default=None,
              help="The model that made the embeddings (e.g. StreetCLIP, open_clip/ViT-L-14:openai): the "
                   "cache's provenance, compared when a run is evaluated on another cache. Required unless --like.")
@click.option("--like", default=None, type=click.Path(exists=True, dir_okay=False, path_type=str),
              help="A cache imported before (the training set): take its backbone name; the width must match.")
@click.option("--format", "fmt", default="auto", show_default=True,
              type=click.Choice(["auto", "parquet", "npy", "webdataset"]),
              help="auto: by extension (.parquet, .npy, .tar).")
@click.option("--metadata", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="With a .npy source: a Parquet or CSV table of id, lat, lon[, split] in the .npy's row order.")
@click.option("--id-column", default=None, help="[default: id]")
@click.option("--lat-column", default=None, help="[default: lat, else latitude]")
@click.option("--lon-column", default=None, help="[default: lon, else lng or longitude]")
@click.option("--split-column", default=None,
              help="[default: split, if present] Values train/val/test or 0/1/2; '' ignores the source's split.")
@click.option("--embedding-column", default=None, help="Parquet: the list-of-floats column [default: embedding].")
@click.option("--assign-split", default="hash", show_default=True, type=click.Choice(["hash", "train", "val", "test"]),
              help="For a source without a split: hash = by a hash of the id (as geo manifests), or one split "
                   "for every row (e.g. test for a test set).")
@click.option("--val-fraction", default=0.1, show_default=True, type=float, help="With --assign-split hash.")
@click.option("--test-fraction", default=0.1, show_default=True, type=float, help="With --assign-split hash.")
@click.option("--feature-dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32"]))
@click.option("--block-rows", default=8192, show_default=True, type=int,
              help="Input rows per committed block (what a killed import loses at most).")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache or an unfinished OUT.partial.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def cache_import_command(ctx, source, out, backbone, like, fmt, metadata, id_column, lat_column, lon_column,
                         split_column, embedding_column, assign_split, val_fraction, test_fraction, feature_dtype,
                         block_rows, overwrite, quiet):
    """Turn embeddings made elsewhere into a feature cache, without re-extracting.

    SOURCE: Parquet files (an embedding list column + id, lat, lon[, split]); or one
    .npy of [n, d] with --metadata TABLE; or WebDataset tar shards with one .npy and
    one .json (lat/lon or latitude/longitude[, id][, split]) per sample. Glob patterns
    are expanded (sorted). Everything is streamed; the source is read twice (metadata
    and sha256 first, then the embeddings). Bad metadata (duplicate ids, lat outside
    [-90, 90], lon outside [-180, 180], unknown splits) stops before anything is
    written; rows with missing coordinates or NaN/inf embeddings are skipped and listed
    in /skipped. A killed import resumes when rerun with the same options.

    \b
    Example:
      geo cache import train.parquet --out train.h5 --backbone StreetCLIP
      geo cache import emb.npy --metadata meta.csv --out test.h5 --like train.h5 --assign-split test
      geo cache import 'osv5m/train/*.tar' --out osv5m.h5 --backbone StreetCLIP
    """
    from geo.cache.importer import ImportConfig, import_embeddings
    from geo.cache.sources import Columns
    from geo.pipeline.countries import country_codes
    from geo.pipeline.manifest import assign_splits

    explicit = ctx.get_parameter_source("assign_split") == click.core.ParameterSource.COMMANDLINE
    if backbone is None and like is None:
        raise click.UsageError("name the model that made the embeddings with --backbone NAME (or --like an "
                               "imported cache)")
    config = ImportConfig(backbone=backbone, like=like, format=fmt, metadata=metadata,
                          columns=Columns(id=id_column, lat=lat_column, lon=lon_column, split=split_column,
                                          embedding=embedding_column),
                          assign_split=assign_split, val_fraction=val_fraction, test_fraction=test_fraction,
                          feature_dtype=feature_dtype, block_rows=block_rows, overwrite=overwrite)
    result = import_embeddings(source, out, config, country_fn=country_codes, split_fn=assign_splits,
                               explicit_assign=explicit, show_progress=not quiet)
    click.echo(f"cache: {result.cache_path} ({result.n_rows} rows, {result.n_skipped} skipped)")
