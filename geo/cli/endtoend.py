"""`geo finetune`: end-to-end fine-tuning of a run's backbone and head (geo/endtoend)."""

from __future__ import annotations

import click

from geo.cli.group import cli


@cli.command("finetune")
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=str))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=str),
              help="The new run directory (run format, plus backbone.pt and its own cache).")
@click.option("--epochs", default=5, show_default=True, type=int, help="Passes over the manifest's train split.")
@click.option("--lr", default=1e-5, show_default=True, type=float, help="Peak AdamW learning rate, backbone and head.")
@click.option("--batch-size", default=32, show_default=True, type=int,
              help="Images per optimizer step (the global batch under torchrun).")
@click.option("--warmup-fraction", default=0.05, show_default=True, type=float,
              help="Fraction of steps of linear warm-up; cosine decay after (as fit-head).")
@click.option("--min-lr-fraction", default=0.01, show_default=True, type=float, help="The cosine decays to lr times this.")
@click.option("--weight-decay", default=None, type=float,
              help="Decoupled weight decay on the head's W [default: the parent run's]; never on the backbone.")
@click.option("--finetune-blocks", default=None, type=int,
              help="Train only the last N blocks of the backbone (as geo extract); 0 = backbone frozen, the head "
                   "alone [default: the whole backbone].")
@click.option("--augment/--no-augment", default=True, show_default=True,
              help="The backbone's training augmentation (random crop, flip, colour jitter) or its eval transform.")
@click.option("--workers", default=None, type=int, help="DataLoader worker processes [default: as geo extract].")
@click.option("--device", default="auto", show_default=True, help="auto (cuda, mps, cpu), cpu, cuda, cuda:1 ...")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "bf16", "fp32"]),
              help="The backbone's autocast (auto = bf16 where the device runs it natively); the head's vMF "
                   "terms always run in float32/float64.")
@click.option("--seed", default=0, show_default=True, type=int, help="Data order and augmentation.")
@click.option("--checkpoint-every", default=0, show_default=True, type=int,
              help="Steps between resumable states; 0 = once per epoch.")
@click.option("--backbone-checkpoint", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="The parent cache's backbone checkpoint, if it moved (its sha256 must be the recorded one).")
@click.option("--allow-other-manifest", is_flag=True,
              help="Fine-tune on a manifest whose rows differ from those the parent run's cache was built from.")
@click.option("--overwrite", is_flag=True, help="Start NEW_RUN again, replacing another configuration.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def finetune_cmd(run, manifest, out, epochs, lr, batch_size, warmup_fraction, min_lr_fraction, weight_decay,
                 finetune_blocks, augment, workers, device, precision, seed, checkpoint_every, backbone_checkpoint,
                 allow_other_manifest, overwrite, quiet):
    """Fine-tune a finished run's backbone and head together, with the head's own loss (paper table 2).

    Starts from RUN's selected head and the backbone checkpoint RUN's cache was extracted
    with (sha256 verified), trains both on MANIFEST's train split (AdamW, warm-up + cosine)
    and selects on val with RUN's --select-by. OUT is a run directory like any other
    (geo evaluate, report and predict read it) with the fine-tuned backbone.pt and its own
    cache of MANIFEST's val and test rows. Other test sets must go through the new backbone:
    `geo extract TEST --like OUT`; a cache of the old backbone is refused. Rerunning the same
    command resumes. Under `torchrun --nproc_per_node N` the global batch is split over ranks.

    \b
    Example:
      geo finetune runs/mvmf-c8192-k16 train.parquet --out runs/mvmf-c8192-k16-e2e
      geo extract im2gps3k.parquet --like runs/mvmf-c8192-k16-e2e --out im2gps3k-e2e.h5
      geo evaluate runs/mvmf-c8192-k16-e2e --cache im2gps3k-e2e.h5 --name im2gps3k
      geo report runs/ --out report/
    """
    from geo.endtoend.config import EndToEndConfig
    from geo.endtoend.finetune import run_finetune
    from geo.training.evaluate import format_metrics

    config = EndToEndConfig(epochs=epochs, lr=lr, batch_size=batch_size, warmup_fraction=warmup_fraction,
                            min_lr_fraction=min_lr_fraction, weight_decay=weight_decay,
                            finetune_blocks=finetune_blocks, augment=augment, workers=workers, device=device,
                            precision=precision, seed=seed, checkpoint_every=checkpoint_every,
                            backbone_checkpoint=backbone_checkpoint, allow_other_manifest=allow_other_manifest,
                            overwrite=overwrite)
    metrics = run_finetune(run, manifest, out, config, progress=not quiet)
    if metrics:
        click.echo(format_metrics(metrics))
        click.echo(f"wrote {out} (run format, backbone.pt and its cache); test sets: "
                   f"geo extract TEST --like {out}")
