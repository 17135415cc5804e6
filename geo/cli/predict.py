"""`geo predict`: geolocate new images with a trained run."""

from __future__ import annotations

import click

from geo.cli.group import cli


# ---- predict ----------------------------------------------------------------


@cli.command("predict")
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(min=1), help="Locations per image.")
@click.option("--predict", "mode", default=None,
              help="A mode the run's head offers: argmax (the most probable components / cells), mode (density "
                   "maxima), for softmax also centre / mean [default: the run's].")
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
    predicted probability, followed (on stderr) by how often the run's 95 % and 50 %
    credible regions held the truth on its own test split. The prediction uses the pixels only: EXIF metadata (GPS
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
        from geo.inference.maps import write_maps

        for path in write_maps(predictor.head, results, map_path):
            click.echo(f"wrote {path}", err=True)
    if any(r.ok and r.radius_95_km is not None for r in results):
        click.echo(predictor.calibration, err=True)  # stderr: --json output stays one object per line
    n_bad = sum(not r.ok for r in results)
    if n_bad:
        click.echo(f"{n_bad} of {len(results)} images could not be read (reasons above)", err=True)
    if timing:
        t = predictor.timings
        click.echo(f"{len(results)} images in {t['total']:.2f} s ({len(results) / max(t['total'], 1e-9):.1f} images/s): "
                   f"decode {t['decode']:.2f} s, backbone {t['backbone']:.2f} s, head + radii {t['head']:.2f} s, "
                   f"places {t['places']:.2f} s", err=True)
