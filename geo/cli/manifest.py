"""`geo manifest`: manifests from a folder of geotagged photos or from benchmark datasets as distributed.

A group with a default: ``geo manifest FOLDER --out m.parquet`` (the original form)
means ``geo manifest exif FOLDER --out m.parquet``; a first argument that names a
subcommand (mp16, im2gps, im2gps3k, yfcc4k, yfcc26k, osv5m, webdataset, exif)
selects it.
"""

from __future__ import annotations

import click

from geo.cli.group import cli

DEFAULT_COMMAND = "exif"


class _DefaultGroup(click.Group):
    """A group whose unknown first argument (a folder) goes to ``DEFAULT_COMMAND``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


def _print_summary(out: str, manifest, counts: dict) -> None:
    splits = ", ".join(f"{name} {n}" for name, n in manifest.split_counts().items() if n)
    click.echo(f"wrote {len(manifest)} images with metadata and pixels to {out} ({splits})")
    left_out = {k: v for k, v in counts.items() if k != "rows"}
    click.echo(f"left out {sum(left_out.values())} (listed with the reason in {out}.skipped.csv)")
    for reason, n in sorted(left_out.items(), key=lambda kv: -kv[1]):
        click.echo(f"  {n:8d}  {reason}")


@cli.group("manifest", cls=_DefaultGroup, invoke_without_command=False)
def manifest_group():
    """Build a manifest (id, path, lat, lon, split) for `geo extract`.

    Rows of sharded datasets point into their shards (PATH = SHARD#MEMBER), so nothing
    is unpacked. Every image or metadata row left out is listed with the reason in
    OUT.skipped.csv.

    \b
    Example:
      geo manifest photos/ --out manifest.parquet            (= geo manifest exif ...)
      geo manifest mp16 --csv mp16_places365.csv --images shards/ --out mp16.parquet
      geo manifest im2gps3k --csv im2gps3k_places365.csv --images im2gps3k/ --out im2gps3k.parquet
      geo manifest osv5m osv5m/ --split test --out osv5m_test.parquet
      geo manifest webdataset 'wds/shard-{000000..000009}.tar' --out wds.parquet
    """


@manifest_group.command("exif")
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
      geo manifest exif photos/ --out manifest.parquet --val-fraction 0.1 --test-fraction 0.1
      geo manifest photos/ --out manifest.parquet
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


_SPLIT = click.option("--split", default=None, type=click.Choice(["train", "val", "test", "hash"]),
                      help="Put every row in this split; hash = 80/10/10 by a hash of the id "
                           "[default: test for a test set, hash for a training set].")


def _places365_command(name: str, test_set: bool, yfcc100m: bool = False):
    """The subcommand ``name``: a places365 CSV (``--csv``) or, for YFCC, raw YFCC100M rows (``--metadata``)."""
    def command(csv_path, images, out, split, metadata_path=None):
        from geo.pipeline.datasets.common import split_codes, write_dataset_manifest

        if (csv_path is None) == (metadata_path is None):
            raise click.UsageError("give exactly one of --csv (a places365 CSV) and --metadata (YFCC100M rows)")
        if csv_path is not None:
            from geo.pipeline.datasets.places365 import read_places365

            rows, source = read_places365(csv_path, images), csv_path
        else:
            from geo.pipeline.datasets.yfcc100m import read_yfcc100m

            rows, source = read_yfcc100m(metadata_path, images), metadata_path
        manifest, counts = write_dataset_manifest(
            out, rows, split=split_codes(rows.ids, split, default="test" if test_set else "hash"), source=source)
        _print_summary(out, manifest, counts)

    either = " Give it or --metadata." if yfcc100m else ""
    options = [
        click.option("--csv", "csv_path", required=not yfcc100m, default=None,
                     type=click.Path(exists=True, dir_okay=False, path_type=str),
                     help=f"The places365-style CSV ({name}_places365.csv: IMG_ID,AUTHOR,LAT,LON,...).{either}"),
        *([click.option("--metadata", "metadata_path", default=None,
                        type=click.Path(exists=True, dir_okay=False, path_type=str),
                        help="YFCC100M's raw tab-separated metadata rows (25 or 23 fields, optionally .gz); "
                             "images named by photo id (or photo hash).")] if yfcc100m else []),
        click.option("--images", required=True, type=click.Path(exists=True, file_okay=False, path_type=str),
                     help="A folder of MessagePack shards (*.msg) or of images named by IMG_ID."),
        click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=str),
                     help="Parquet manifest to write (also OUT.skipped.csv)."),
        _SPLIT,
    ]
    for option in reversed(options):  # click lists options in decorator order
        command = option(command)

    kind = "test set: every row in test" if test_set else "training set: rows hashed into train/val/test"
    source = "a places365 CSV or YFCC100M's raw metadata rows" if yfcc100m else "a places365 CSV"
    help_text = (f"{name} as distributed: {source} and its images ({kind}).\n\n"
                 f"\b\nExample:\n  geo manifest {name} --csv {name}_places365.csv "
                 f"--images {name}/ --out {name}.parquet")
    if yfcc100m:
        help_text += f"\n  geo manifest {name} --metadata {name}.tsv --images {name}/ --out {name}.parquet"
    return manifest_group.command(name, help=help_text)(command)


for _name, _test in (("mp16", False), ("im2gps", True), ("im2gps3k", True), ("yfcc4k", True), ("yfcc26k", True)):
    _places365_command(_name, _test, yfcc100m=_name.startswith("yfcc"))


@manifest_group.command("osv5m")
@click.argument("dataset_dir", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--split", "osv_split", default="test", show_default=True, type=click.Choice(["train", "test"]),
              help="Which of OSV-5M's files (train.csv / test.csv) and image folders to read.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="Parquet manifest to write (also OUT.skipped.csv).")
def osv5m_cmd(dataset_dir, osv_split, out):
    """OSV-5M as distributed: SPLIT.csv and images/SPLIT/NN.zip (or extracted folders).

    The test split's rows all go to test; train's are hashed into train/val/test.
    The dataset's own country labels are kept (column country) and used by
    `geo extract`; their agreement with geo's offline labels is printed.

    \b
    Example:
      geo manifest osv5m osv5m/ --split test --out osv5m_test.parquet
    """
    from geo.pipeline.datasets.common import split_codes, write_dataset_manifest
    from geo.pipeline.datasets.osv5m import country_agreement, read_osv5m

    rows = read_osv5m(dataset_dir, osv_split)
    manifest, counts = write_dataset_manifest(
        out, rows, split=split_codes(rows.ids, None, default="test" if osv_split == "test" else "hash"),
        source=dataset_dir)
    _print_summary(out, manifest, counts)
    agree, n = country_agreement(manifest)
    if n:
        click.echo(f"country labels: OSV-5M's agree with geo's offline labels on {agree} of {n} images "
                   f"({100 * agree / n:.1f} %); OSV-5M's are used")


@manifest_group.command("webdataset")
@click.argument("pattern")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="Parquet manifest to write (also OUT.skipped.csv).")
@click.option("--lat-key", default=None, help="JSON field of the latitude [default: lat, then latitude].")
@click.option("--lon-key", default=None, help="JSON field of the longitude [default: lon, lng, then longitude].")
@_SPLIT
def webdataset_cmd(pattern, out, lat_key, lon_key, split):
    """WebDataset tar shards: an image and a .json per key; PATTERN with brace ranges.

    \b
    Example:
      geo manifest webdataset 'wds/shard-{000000..000009}.tar' --out wds.parquet --split test
      geo manifest webdataset 'wds/shard-{000..003}.tar' --lat-key gps_lat --lon-key gps_lon --out wds.parquet
    """
    from geo.pipeline.datasets.common import split_codes, write_dataset_manifest
    from geo.pipeline.datasets.webdataset import read_webdataset

    rows = read_webdataset(pattern, lat_key=lat_key, lon_key=lon_key)
    manifest, counts = write_dataset_manifest(out, rows, split=split_codes(rows.ids, split, default="hash"),
                                              source=pattern)
    _print_summary(out, manifest, counts)
