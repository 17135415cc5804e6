"""`geo finetune`: end-to-end fine-tuning of a run's backbone and head (geo/endtoend).

A tiny world: real JPEGs (tests/support/images.py), resnet18 at 32 px without country
fine-tuning, heads trained on its features; then the second round through the images.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from support.images import write_dataset
from geo.cache.store import FeatureCache
from geo.cli import cli
from geo.endtoend.data import SeededBatches, count_differing_rows, epoch_order
from geo.endtoend.config import EndToEndConfig
from geo.endtoend.finetune import run_finetune
from geo.endtoend.model import EndToEnd, freeze, head_loss_fn, make_optimizer
from geo.errors import ConfigError
from geo.files import sha256_file
from geo.geometry import latlon_to_xyz
from geo.pipeline.backbone import Placement, backbone_eval_transform, create_backbone
from geo.pipeline.extract import ExtractConfig, run_extract
from geo.pipeline.finetune import image_loader, train_step
from geo.pipeline.manifest import read_manifest
from geo.training import runs, trainer
from geo.training.config import FitConfig
from geo.training.fit import fit_head

CPU = Placement(torch.device("cpu"), "fp32", False)
FIT = dict(n_cells=6, batch_size=8, epochs=2, lr=1e-2, precision="fp32", device="cpu")
E2E = dict(epochs=1, batch_size=8, workers=0, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A manifest (30 rows: train/val/test), its cache (resnet18, 32 px) and an mvmf and a knn run on it."""
    root = tmp_path_factory.mktemp("e2e")
    manifest = write_dataset(root / "data", 30)
    cache = run_extract(manifest, root / "cache.h5", ExtractConfig(
        backbone="resnet18", image_size=32, finetune_epochs=0, batch_size=8, precision="fp32", device="cpu",
        workers=0)).cache_path
    fit_head(cache, FitConfig(head="mvmf", **FIT), root / "runs" / "mvmf", progress=False)
    fit_head(cache, FitConfig(head="knn", **dict(FIT, epochs=1)), root / "runs" / "knn", progress=False)
    return root, manifest, cache


# ---- the loss: one step equals fit-head's ------------------------------------------------------------


@pytest.mark.parametrize("head_name", ["mvmf", "softmax"])
def test_frozen_backbone_step_equals_a_fit_head_step_on_extracted_features(world, tmp_path, head_name):
    root, manifest_path, cache_path = world
    run_dir = root / "runs" / "mvmf" if head_name == "mvmf" else tmp_path / "softmax"
    if head_name == "softmax":
        fit_head(cache_path, FitConfig(head="softmax", **FIT), run_dir, progress=False)
    config = runs.read_config(run_dir)
    manifest = read_manifest(manifest_path)
    rows = np.flatnonzero(manifest.split == 0)[:8]
    # The batch as `geo finetune --no-augment` loads it: the backbone's eval transform.
    backbone = create_backbone("resnet18", config["cache_provenance"]["checkpoint_path"], num_classes=1)
    (_, images, _), = list(image_loader(manifest.paths[rows], backbone_eval_transform(backbone), batch_size=8,
                                        workers=0))
    # Reference: fit-head's step on the features the backbone extracts (what the cache stores, in float32).
    with torch.no_grad():
        features = backbone.eval().forward_features(images).float()
    with FeatureCache(cache_path) as cache:  # and they are the cached ones (float16 storage)
        index = {i: r for r, i in enumerate(cache.ids)}
        cached = cache.load_features([index[i] for i in manifest.ids[rows]]).astype(np.float32)
    np.testing.assert_allclose(features.numpy(), cached, rtol=2e-3, atol=2e-3)

    head_ref = runs.load_head(run_dir).head.train()
    head_e2e = copy.deepcopy(head_ref)
    cfg = dict(config, lr=1e-2)
    targets = {"target_xyz": torch.from_numpy(latlon_to_xyz(manifest.lat_deg[rows], manifest.lon_deg[rows])
                                              .astype(np.float32)),
               **{k: t for k, t in head_ref.row_targets(manifest.lat_deg[rows], manifest.lon_deg[rows]).items()}}
    before = {k: v.clone() for k, v in head_ref.state_dict().items()}
    opt_ref = trainer.make_optimizer(head_ref, cfg)
    loss_ref = trainer.train_step(head_ref, opt_ref, features, targets, chunk_rows=config["chunk_rows"])

    freeze(backbone, 0)
    model = EndToEnd(backbone, head_e2e, torch.float32).train()
    opt = make_optimizer(model, cfg)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(len(g["params"]) for g in opt_ref.param_groups)
    _, loss = train_step(model, opt, images, targets, CPU, loss_fn=head_loss_fn(head_e2e))

    assert float(loss.detach()) == pytest.approx(float(loss_ref), rel=1e-5)
    moved = 0
    for (name, ref), (_, ours) in zip(head_ref.state_dict().items(), head_e2e.state_dict().items()):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6, msg=name)
        moved += int(not torch.equal(ref, before[name]))
    assert moved >= 2  # the step did change the head (W and b at least)
    assert not model.backbone.training or all(not m.training for m in model.backbone.trunk.modules())


# ---- data order -------------------------------------------------------------------------------------


def test_rank_shards_of_each_batch_make_the_single_process_batch(world):
    _, manifest_path, _ = world
    manifest = read_manifest(manifest_path)
    paths = manifest.paths[manifest.split == 0]
    backbone = create_backbone("resnet18", "none", image_size=32)
    pre = backbone.preprocess
    order = epoch_order(len(paths), seed=3, epoch=1)
    make = lambda rank, world: SeededBatches(paths, order, 5, seed=3, epoch=1, first_batch=1,  # noqa: E731
                                             transform=pre.train_transform(),
                                             batch_transform=pre.train_batch_transform(), rank=rank, world_size=world)
    one, a, b = make(0, 1), make(0, 2), make(1, 2)
    assert len(one) == -(-len(paths) // 5) - 1
    for k in range(len(one)):
        i1, x1, _, n = one[k]
        ia, xa, _, _ = a[k]
        ib, xb, _, _ = b[k]
        assert n == len(one.global_rows(k))
        assert torch.equal(torch.cat([ia, ib]), i1)
        # The same pixels: augmentation is seeded per global batch, whoever decodes it.
        torch.testing.assert_close(torch.cat([xa, xb]), x1)
        torch.testing.assert_close(one[k][1], x1)  # and again: a resumed run sees the same batch


def test_count_differing_rows_against_brute_force(world):
    root, manifest_path, cache_path = world
    manifest = read_manifest(manifest_path)
    with FeatureCache(cache_path) as cache:
        assert count_differing_rows(manifest, cache) == 0
        other = manifest.__class__(**{**manifest.__dict__})
        other.ids = manifest.ids.copy()
        other.ids[0] = "new-id"                         # 1 row only in ours, 1 only in the cache
        other.lat_deg = manifest.lat_deg.copy()
        other.lat_deg[3] += 1.0                          # same id, moved
        other.split = manifest.split.copy()
        other.split[5] = (other.split[5] + 1) % 3        # same id, other split
        assert count_differing_rows(other, cache) == 4


# ---- bad input: refused before any work -------------------------------------------------------------


def _refused(world, tmp_path, config=EndToEndConfig(**E2E), *, run="mvmf", manifest=None) -> str:
    root, manifest_path, _ = world
    out = tmp_path / "child"
    with pytest.raises(ConfigError) as err:
        run_finetune(root / "runs" / run, manifest or manifest_path, out, config, progress=False)
    assert not out.exists(), "nothing may be written for refused input"
    return str(err.value)


def test_a_head_with_nothing_to_train_is_refused(world, tmp_path):
    assert "nothing to train" in _refused(world, tmp_path, run="knn")


@pytest.mark.parametrize("option, value, flag", [("epochs", 0, "--epochs"), ("lr", -1.0, "--lr"),
                                                 ("batch_size", 0, "--batch-size"), ("finetune_blocks", -1, "--finetune-blocks"),
                                                 ("warmup_fraction", 1.0, "--warmup-fraction"),
                                                 ("checkpoint_every", -2, "--checkpoint-every")])
def test_options_out_of_range_are_refused(world, tmp_path, option, value, flag):
    assert flag in _refused(world, tmp_path, EndToEndConfig(**dict(E2E, **{option: value})))


def test_a_manifest_without_val_is_refused(world, tmp_path):
    manifest = write_dataset(tmp_path / "noval", 6, splits=["train"] * 5 + ["test"])
    assert "val split" in _refused(world, tmp_path, manifest=manifest)


def test_a_manifest_with_other_rows_is_refused_with_the_count(world, tmp_path):
    root, manifest_path, _ = world
    lines = Path(manifest_path).read_text().splitlines()
    lines[1] = lines[1].replace("id000", "other000")
    lines[5] = lines[5].replace(",48.", ",47.")  # row id004 (FR) moved by a degree
    assert lines[5] != Path(manifest_path).read_text().splitlines()[5]
    other = Path(manifest_path).with_name("other.csv")
    other.write_text("\n".join(lines) + "\n")
    message = _refused(world, tmp_path, manifest=other)
    assert "3 rows differ" in message and "--allow-other-manifest" in message


def test_a_moved_or_changed_backbone_checkpoint_is_refused_naming_both_hashes(world, tmp_path):
    root, _, _ = world
    recorded = runs.read_config(root / "runs" / "mvmf")["cache_provenance"]
    wrong = tmp_path / "wrong.pt"
    wrong.write_bytes(b"not the checkpoint")
    message = _refused(world, tmp_path, EndToEndConfig(**E2E, backbone_checkpoint=str(wrong)))
    assert recorded["weights"] in message and sha256_file(wrong) in message and "--backbone-checkpoint" in message
    message = _refused(world, tmp_path, EndToEndConfig(**E2E, backbone_checkpoint=str(tmp_path / "gone.pt")))
    assert "missing" in message and recorded["weights"] in message


# ---- end to end --------------------------------------------------------------------------------------


def _invoke(*args) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_extract_fit_finetune_evaluate_report(world, tmp_path):
    root, manifest, cache = world
    parent = root / "runs" / "mvmf"
    child = tmp_path / "runs" / "mvmf-e2e"
    _invoke("finetune", parent, manifest, "--out", child, "--epochs", "1", "--batch-size", "8", "--workers", "0",
            "--device", "cpu", "--precision", "fp32", "--quiet", "--lr", "1e-3")
    config = runs.read_config(child)
    assert config["parent_run"] == str(parent.resolve()) and config["stage"] == "end-to-end"
    for name in ("metrics.jsonl", "metrics.json", "predictions.parquet", "checkpoint.pt", "backbone.pt", "cache.h5"):
        assert (child / name).is_file(), name
    assert not (child / "e2e_state.pt").exists()
    # The run's own cache holds val and test through the fine-tuned backbone, and says so.
    with FeatureCache(child / "cache.h5") as own:
        assert own.provenance["weights"] == sha256_file(child / "backbone.pt") != config["backbone_init_sha256"]
        assert sorted(set(own.split.tolist())) == [1, 2]

    # A second test set: through the new backbone for the child, the old one for the parent.
    test_manifest = write_dataset(tmp_path / "second", 8, seed=5, splits=["test"] * 8)
    _invoke("extract", test_manifest, "--like", child, "--out", tmp_path / "second-e2e.h5", "--workers", "0")
    _invoke("extract", test_manifest, "--like", cache, "--out", tmp_path / "second.h5", "--workers", "0")
    refused = CliRunner().invoke(cli, ["evaluate", str(child), "--cache", str(tmp_path / "second.h5")])
    assert refused.exit_code == 2 and "provenance differs" in refused.output
    _invoke("evaluate", child, "--cache", tmp_path / "second-e2e.h5", "--name", "second", "--quiet")
    _invoke("evaluate", parent, "--cache", tmp_path / "second.h5", "--name", "second", "--quiet")
    shutil.copytree(parent, tmp_path / "runs" / "mvmf")  # parent and child under one folder
    child_cfg = json.loads((child / "config.json").read_text())
    child_cfg["parent_run"] = str((tmp_path / "runs" / "mvmf").resolve())
    (child / "config.json").write_text(json.dumps(child_cfg))
    _invoke("report", tmp_path / "runs", "--out", tmp_path / "report", "--format", "md")
    report = (tmp_path / "report" / "report.md").read_text()
    section = report[report.index("## Test set second"):]
    table = [line for line in section.splitlines() if line.startswith("| mvmf")]
    assert [line.split("|")[5].strip() for line in table[:2]] == ["frozen", "end-to-end"]
    assert "**Claim 6** on second: End-to-end fine-tuning improves the head" in section
    assert section.count("end-to-end (mvmf-e2e)") == 5  # a paired verdict per scale
    # geo predict works on it like on any run.
    _invoke("predict", child, str(Path(manifest).parent / "img000.jpg"))


# ---- interruptions and DDP ------------------------------------------------------------------------


def _finetune_cmd(parent, manifest, out, *extra) -> list[str]:
    return [sys.executable, "-m", "geo", "finetune", str(parent), str(manifest), "--out", str(out),
            "--epochs", "2", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--precision", "fp32",
            "--lr", "1e-3", "--quiet", *extra]


def _run_files(out: Path) -> dict:
    """What a finished run holds, comparable between runs (no wall-clock values)."""
    import pyarrow.parquet as pq

    log = [{k: v for k, v in line.items() if k != "elapsed_s"} for line in runs.read_jsonl(out / "metrics.jsonl")]
    checkpoint = runs.load_checkpoint(out / "checkpoint.pt")
    backbone = torch.load(out / "backbone.pt", weights_only=True)["model"]
    metrics = {k: v for k, v in runs.read_json(out / "metrics.json").items() if k not in ("train_elapsed_s",)}
    return {"log": log, "head": checkpoint["best"]["head_state"], "backbone": backbone, "metrics": metrics,
            "predictions": pq.read_table(out / "predictions.parquet").to_pydict()}


@pytest.mark.slow
def test_sigkill_and_rerun_ends_identical_to_an_uninterrupted_run(world, tmp_path):
    root, manifest, _ = world
    parent = root / "runs" / "mvmf"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = subprocess.run(_finetune_cmd(parent, manifest, straight), env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    cmd = _finetune_cmd(parent, manifest, killed, "--checkpoint-every", "1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (killed / "e2e_state.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-run: after a state was saved, somewhere in the next steps
    proc.wait()
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"
    saved_step = runs.load_checkpoint(killed / "e2e_state.pt")["step"]
    assert 1 <= saved_step < 6
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    # --checkpoint-every only saves states: it is not part of the result, but it is a recorded option.
    a, b = _run_files(straight), _run_files(killed)
    assert a["log"] == b["log"] and a["metrics"].keys() == b["metrics"].keys()
    for key in ("head", "backbone"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert a["predictions"] == b["predictions"]


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    # A ViT: no BatchNorm, whose per-rank batch statistics would differ from one process's by design.
    backbone = "timm/vit_tiny_patch16_224"
    manifest = write_dataset(tmp_path / "data", 30)
    cache = run_extract(manifest, tmp_path / "cache.h5", ExtractConfig(
        backbone=backbone, image_size=32, finetune_epochs=0, batch_size=8, precision="fp32", device="cpu",
        workers=0)).cache_path
    parent = tmp_path / "runs" / "mvmf"
    fit_head(cache, FitConfig(head="mvmf", **FIT), parent, progress=False)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = _finetune_cmd(parent, manifest, tmp_path / "one")[3:]  # after "python -m geo"
    one = subprocess.run([sys.executable, "-m", "geo", *args], env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    args = _finetune_cmd(parent, manifest, tmp_path / "two")[3:]
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "geo", *args], env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    a, b = _run_files(tmp_path / "one"), _run_files(tmp_path / "two")
    assert [line["step"] for line in a["log"]] == [line["step"] for line in b["log"]] == [3, 6]
    # Adam turns a gradient element near 0 into a step of up to lr whatever its size, so float rounding
    # (another summation order over ranks) moves weights by a small fraction of lr: compare at 5 % of lr.
    # The attention key bias has an analytically zero gradient (softmax ignores a shift shared by all keys):
    # its steps are Adam steps of rounding noise in both runs, left out.
    lr, init = 1e-3, torch.load(runs.read_config(parent)["cache_provenance"]["checkpoint_path"], weights_only=True)
    moved = 0.0
    for key in ("head", "backbone"):
        for name in a[key]:
            x, y = a[key][name].float(), b[key][name].float()
            if name.endswith("attn.qkv.bias"):
                third = x.numel() // 3
                x, y = torch.cat([x[:third], x[2 * third:]]), torch.cat([y[:third], y[2 * third:]])
            torch.testing.assert_close(y, x, rtol=0, atol=0.05 * lr, msg=f"{key} {name}")
            if key == "backbone" and name.startswith("trunk."):
                moved = max(moved, float((a[key][name].float() - init["model"][name].float()).abs().max()))
    assert moved > 2 * lr  # the backbone did train (6 steps of at most ~lr each)
    for first, second in zip(a["log"], b["log"]):
        assert second["train_loss"] == pytest.approx(first["train_loss"], rel=1e-5)
        assert second["val_geoscore"] == pytest.approx(first["val_geoscore"], rel=1e-3)
    np.testing.assert_allclose(b["predictions"]["dist_km"], a["predictions"]["dist_km"], rtol=1e-3, atol=1e-2)


def test_cli_refuses_bad_input_with_exit_status_2_and_no_traceback(world, tmp_path):
    root, manifest, _ = world
    result = CliRunner().invoke(cli, ["finetune", str(root / "runs" / "knn"), str(manifest), "--out",
                                      str(tmp_path / "child"), "--device", "cpu"])
    assert result.exit_code == 2 and result.output.startswith("Error: ") and "Traceback" not in result.output
    assert "nothing to train" in result.output and not (tmp_path / "child").exists()
