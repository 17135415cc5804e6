"""``geo predict`` end to end: tiny JPEGs -> resnet18 cache (real extract) -> MvMF run (real fit_head) -> predict."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from geo.cli import cli
from geo.errors import GeoError
from geo.geometry import great_circle_km, vmf_radius_km

# Four real places, each with its own colour: the pixels carry the location.
PLACES = [(48.8566, 2.3522, (220, 40, 40)), (-33.8688, 151.2093, (40, 200, 40)),
          (40.7128, -74.0060, (40, 60, 220)), (-1.2921, 36.8219, (230, 220, 40))]
N_PER_PLACE = 16


def _write_image(path, colour, rng, size_px=40):
    pixels = np.clip(rng.normal(0, 12, (size_px, size_px, 3)) + np.array(colour), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=92)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run dir, image folder, manifest rows) of a tiny real pipeline run (~10 s on 2 CPU cores)."""
    from geo.training.config import FitConfig
    from geo.training.fit import fit_head
    from geo.pipeline.extract import ExtractConfig, run_extract

    root = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir()
    lines, rows = ["id,path,lat,lon,split"], []
    for p, (lat, lon, colour) in enumerate(PLACES):
        for i in range(N_PER_PLACE):
            name = f"p{p}_{i:02d}.jpg"
            _write_image(images / name, colour, rng)
            dlat, dlon = rng.normal(0, 0.3, 2)
            split = "val" if i % 8 == 7 else "train"
            lines.append(f"{name[:-4]},{images / name},{lat + dlat},{lon + dlon},{split}")
            rows.append((images / name, lat + dlat, lon + dlon))
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    torch.manual_seed(0)
    run_extract(manifest, root / "cache.h5", ExtractConfig(backbone="resnet18", image_size=32, batch_size=16,
                                                           finetune_epochs=0, precision="fp32", device="cpu"))
    run = root / "run"
    fit_head(root / "cache.h5", FitConfig(head="mvmf", n_cells=8, kappa0=6.0, batch_size=16, lr=3e-2, epochs=60,
                                          device="cpu", precision="fp32"), run, progress=False)
    fit_head(root / "cache.h5", FitConfig(head="softmax", n_cells=8, batch_size=16, lr=3e-2, epochs=20,
                                          device="cpu", precision="fp32"), root / "run_softmax", progress=False)
    return run, images, rows


def _predictor(run, **kw):
    from geo.inference import Predictor

    return Predictor(run, device="cpu", precision="fp32", **kw)


@pytest.mark.slow
def test_training_image_predicted_near_its_place_with_sorted_topk(trained):
    run, _, rows = trained
    predictor = _predictor(run)
    results = predictor.predict([r[0] for r in rows[::N_PER_PLACE]], top_k=4)
    for result, (_, lat, lon) in zip(results, rows[::N_PER_PLACE]):
        assert result.ok
        best = result.locations[0]
        assert great_circle_km(lat, lon, best.lat_deg, best.lon_deg) < 300  # places are >= 6000 km apart
        probs = [loc.prob for loc in result.locations]
        assert all(a >= b for a, b in zip(probs, probs[1:])) and sum(probs) <= 1 + 1e-9
        assert best.country in {"FR", "AU", "US", "KE"}
        assert 0 < result.radius_50_km < result.radius_95_km


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["argmax", "mode"])
def test_softmax_run(trained, mode):
    run, _, rows = trained
    predictor = _predictor(run.parent / "run_softmax", mode=mode)
    result = predictor.predict([rows[0][0]], top_k=3)[0]
    best = result.locations[0]
    if mode == "argmax":  # the most probable cell is the image's own (8 cells: too coarse for a km bound)
        partition = predictor.head.partition
        assert partition.assign([best.lat_deg], [best.lon_deg]) == partition.assign([rows[0][1]], [rows[0][2]])
        probs = [loc.prob for loc in result.locations]
        assert all(a >= b for a, b in zip(probs, probs[1:])) and sum(probs) <= 1 + 1e-9
    if mode == "mode":
        dens = [loc.log_density for loc in result.locations]
        assert all(a >= b for a, b in zip(dens, dens[1:]))
    assert 0 < result.radius_50_km < result.radius_95_km <= math.pi * 6371.01


@pytest.mark.slow
def test_confident_prediction_has_smaller_radius_than_diffuse(trained):
    run, _, rows = trained
    predictor = _predictor(run)
    confident = predictor.predict([rows[0][0]])[0]
    c = predictor.head.n_cells
    # Diffuse: equal weights on every component. Peaked: all weight on one component, whose
    # 50 % radius is the closed form vmf_radius_km of its kappa.
    diffuse = predictor.describe("uniform", torch.zeros(c), top_k=3)
    peaked_logits = torch.full((c,), -60.0)
    peaked_logits[2] = 60.0
    peaked = predictor.describe("peaked", peaked_logits, top_k=3)
    assert confident.radius_50_km < diffuse.radius_50_km
    log_kappa = float(predictor.head.log_kappa.detach()[2])
    assert peaked.radius_50_km == pytest.approx(vmf_radius_km(log_kappa, 0.5), rel=1e-3)
    assert peaked.radius_95_km == pytest.approx(vmf_radius_km(log_kappa, 0.95), rel=1e-3)


@pytest.mark.slow
def test_cli_json_unreadable_image_and_map(trained, tmp_path):
    run, images, rows = trained
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    out_map = tmp_path / "map.png"
    result = CliRunner().invoke(
        cli, ["predict", str(run), str(rows[0][0]), str(bad), str(rows[20][0]), "--json", "--top-k", "3",
              "--device", "cpu", "--map", str(out_map)])
    assert result.exit_code == 0, result.output + result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["ok"] for line in lines] == [True, False, True]
    assert "not an image" in lines[1]["error"] and lines[1]["path"] == str(bad)
    assert len(lines[0]["locations"]) == 3 and math.isfinite(lines[0]["radius_50_km"])
    assert "could not be read" in result.stderr
    # the radii's calibration on the run's own test split, from its metrics.json, on stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert f"95 % regions held the truth for {100 * metrics['coverage@95']:.0f} %" in result.stderr
    assert len(list(tmp_path.glob("map-*.png"))) == 2


@pytest.mark.slow
def test_folder_text_output_and_compare_exif(trained):
    run, images, _ = trained
    result = CliRunner().invoke(cli, ["predict", str(run), str(images), "--top-k", "2", "--compare-exif",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.output.count("50 % of the probability within") == len(PLACES) * N_PER_PLACE
    assert "EXIF GPS: none (no GPS data in EXIF)" in result.output


@pytest.mark.slow
def test_backbone_checksum_mismatch_and_missing_checkpoint_refused(trained, tmp_path):
    from geo.training.runs import read_config

    run, _, rows = trained
    recorded = read_config(run)["cache_provenance"]
    other = tmp_path / "other.pt"
    other.write_bytes(open(recorded["checkpoint_path"], "rb").read() + b"\0")
    result = CliRunner().invoke(cli, ["predict", str(run), str(rows[0][0]), "--backbone-checkpoint", str(other)])
    assert result.exit_code == 2
    assert recorded["weights"] in result.output and str(other) in result.output
    # A byte-identical copy elsewhere is accepted.
    copy = tmp_path / "copy.pt"
    shutil.copy(recorded["checkpoint_path"], copy)
    assert _predictor(run, backbone_checkpoint=copy).predict([rows[0][0]])[0].ok
    # The recorded checkpoint gone: the error names the file and how it was recorded.
    moved = tmp_path / "moved.pt"
    shutil.move(recorded["checkpoint_path"], moved)
    try:
        with pytest.raises(GeoError, match="needs the backbone checkpoint .*missing") as err:
            _predictor(run)
        assert recorded["checkpoint_path"] in str(err.value) and recorded["weights"] in str(err.value)
    finally:
        shutil.move(moved, recorded["checkpoint_path"])


def test_folder_without_images_is_reported(tmp_path):
    (tmp_path / "notes.txt").write_text("no photos here")
    from geo.inference import find_images

    with pytest.raises(GeoError, match="holds no images"):
        find_images([tmp_path])
    result = CliRunner().invoke(cli, ["predict", str(tmp_path), str(tmp_path)])
    assert result.exit_code == 2


def test_geo_predict_is_lazy_and_callable():
    import subprocess
    import sys

    code = "import sys, geo; assert 'torch' not in sys.modules; from geo.inference import predict; " \
           "assert geo.predict is predict"
    subprocess.run([sys.executable, "-c", code], check=True)
