"""Report commands: `geo report` and `geo baseline` (geo/reports)."""

from __future__ import annotations

import click

from geo.cli.group import cli
from geo.cli.options import comma_list


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


@cli.command("baseline")
@click.argument("cache", type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.option("--n-cells", "--classes", "n_cells", default="16,64,256", show_default=True, callback=comma_list(int),
              help="Comma list of c: the partitions whose densest training cell is the prediction.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
def baseline_cmd(cache, n_cells, split):
    """The trivial baseline every head must beat: always predict the densest training cell.

    For each c the adaptive partition of the train split is built as the heads build
    it, and every image of SPLIT is predicted at the mean of the training points of
    the cell holding most of them.

    \b
    Example:
      geo baseline cache.h5 --n-cells 16,64,256
    """
    from geo.reports.baseline import densest_cell_baseline, format_baseline

    click.echo(format_baseline(densest_cell_baseline(cache, n_cells, split), split))
