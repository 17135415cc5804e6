"""`geo cache import`: embeddings made elsewhere (Parquet, .npy + table, WebDataset shards) -> a feature cache.

Each source, generated here, must give exactly the cache that ``CacheWriter`` writes
directly from the same rows (features, lat, lon, id, split, country, /skipped and the
block commits: ``assert_same_content`` compares every dataset and attribute); every
bad input gives its clear error (exit status 2, file and row named) or a skipped row
with its reason; a SIGKILLed import resumes to the identical file.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from support.caches import CITIES, PROVENANCE, assert_same_content

from geo.cache.importer import ImportConfig, import_embeddings
from geo.cache.schema import SPLIT_NAMES, partial_path
from geo.cache.sources import Columns
from geo.cache.store import CacheWriter, FeatureCache
from geo.cli import cli
from geo.errors import CacheError, ManifestError
from geo.pipeline.countries import country_codes
from geo.pipeline.manifest import assign_splits
from geo.training.runs import feature_provenance_differences

REPO = Path(__file__).resolve().parents[2]
BLOCK = 64


@dataclass
class Embeddings:
    """Rows made elsewhere: what the source holds."""

    ids: list
    lat: np.ndarray
    lon: np.ndarray
    split: np.ndarray  # uint8 codes
    x: np.ndarray  # float32 [n, d]


def make_embeddings(n=300, d=12, seed=0) -> Embeddings:
    """Rows scattered ~50 km around real cities (so their countries are real) and one in the open Pacific."""
    rng = np.random.default_rng(seed)
    city = np.array(CITIES)[rng.integers(len(CITIES), size=n)]
    lat = np.clip(city[:, 0] + rng.normal(scale=0.4, size=n), -89, 89)
    lon = city[:, 1] + rng.normal(scale=0.4, size=n)
    lat[5], lon[5] = -30.0, -140.0  # open sea: "XX"
    return Embeddings([f"photo/{seed}/{i:05d}" for i in range(n)], lat, lon,
                      rng.choice(3, size=n, p=[0.7, 0.15, 0.15]).astype(np.uint8),
                      rng.normal(size=(n, d)).astype(np.float32))


def write_parquet(path, e: Embeddings, *, kind="list", split="names", row_group_size=70, n_files=1):
    """e as Parquet file(s) with columns id, lat, lon[, split], embedding (list or fixed_size_list)."""
    n, d = e.x.shape
    paths = []
    for k, rows in enumerate(np.array_split(np.arange(n), n_files)):
        x = e.x[rows]
        emb = (pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), d) if kind == "fixed"
               else pa.array([list(r) for r in x], pa.list_(pa.float32())))
        cols = {"id": [e.ids[i] for i in rows], "lat": e.lat[rows], "lon": e.lon[rows]}
        if split == "names":
            cols["split"] = [SPLIT_NAMES[c] for c in e.split[rows]]
        elif split == "codes":
            cols["split"] = e.split[rows].astype(np.int64)
        cols["embedding"] = emb
        target = Path(path) if n_files == 1 else Path(path).with_name(f"{Path(path).stem}-{k}.parquet")
        pq.write_table(pa.table(cols), target, row_group_size=row_group_size)
        paths.append(target)
    return paths


def write_npy(folder, e: Embeddings, *, table="csv"):
    """e as emb.npy [n, d] + a metadata table (CSV or Parquet) with id, lat, lon, split."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "emb.npy", e.x)
    meta = pa.table({"id": e.ids, "lat": e.lat, "lon": e.lon, "split": [SPLIT_NAMES[c] for c in e.split]})
    target = folder / ("meta.csv" if table == "csv" else "meta.parquet")
    if table == "csv":
        pa_csv.write_csv(meta, target)
    else:
        pq.write_table(meta, target)
    return folder / "emb.npy", target


def write_shards(folder, e: Embeddings, *, n_shards=3, keys=("lat", "lon"), id_in_json=False, split=True,
                 edit=None):
    """e as WebDataset shards: per sample KEY.npy and KEY.json; ``edit(i, meta, x)`` may change a sample."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, rows in enumerate(np.array_split(np.arange(len(e.ids)), n_shards)):
        path = folder / f"shard-{k:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in rows:
                key = f"s{i:06d}"
                meta = {keys[0]: float(e.lat[i]), keys[1]: float(e.lon[i]), "country_name": "ignored"}
                if id_in_json:
                    meta["id"] = e.ids[i]
                if split:
                    meta["split"] = SPLIT_NAMES[e.split[i]]
                x = e.x[i]
                if edit is not None:
                    meta, x = edit(int(i), meta, x)
                members = []
                if x is not None:
                    buf = io.BytesIO()
                    np.save(buf, x)
                    members.append((f"{key}.npy", buf.getvalue()))
                if meta is not None:
                    members.append((f"{key}.json", json.dumps(meta).encode()))
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def direct_cache(path, e: Embeddings, provenance: dict, *, ids=None, skipped=None, block_rows=BLOCK,
                 feature_dtype="float16"):
    """The cache CacheWriter writes from e directly, in blocks of block_rows input rows.

    skipped: {row: reason} of rows left out. Countries as geo extract labels them: the sorted
    codes of the rows written.
    """
    skipped = skipped or {}
    ids = e.ids if ids is None else ids
    n = len(ids)
    keep = np.array([i not in skipped for i in range(n)])
    has = ~(np.isnan(e.lat) | np.isnan(e.lon))
    codes = np.full(n, "", dtype="<U2")
    codes[has] = country_codes(e.lat[has], e.lon[has])
    countries = sorted(set(codes[has].tolist()))
    country = np.array([countries.index(c) if c else -1 for c in codes], dtype=np.int16)
    with CacheWriter(path, feature_dim=e.x.shape[1], countries=countries, provenance=provenance,
                     feature_dtype=feature_dtype) as w:
        for lo in range(0, n, block_rows):
            sl = slice(lo, min(lo + block_rows, n))
            k = keep[sl]
            w.write_block(features=e.x[sl][k], ids=np.array(ids[sl])[k], lat_deg=e.lat[sl][k], lon_deg=e.lon[sl][k],
                          split=e.split[sl][k], country=country[sl][k],
                          skipped=[(ids[i], skipped[i]) for i in range(sl.start, sl.stop) if i in skipped],
                          rows_consumed=sl.stop - sl.start)
        return w.finalize()


def run_import(sources, out, **options):
    config = ImportConfig(**{"backbone": "StreetCLIP", "block_rows": BLOCK, **options})
    return import_embeddings([str(s) for s in sources], out, config, country_fn=country_codes,
                             split_fn=assign_splits, show_progress=False)


def provenance_of(path) -> dict:
    with FeatureCache(path, validate=False) as cache:
        return dict(cache.provenance)


def cli_import(*args):
    return CliRunner().invoke(cli, ["cache", "import", *map(str, args), "--quiet"])


# ---- every source gives the cache written directly ---------------------------------------


@pytest.mark.parametrize("kind,split,n_files", [("list", "names", 1), ("fixed", "codes", 1), ("list", "names", 3)])
def test_parquet_import_equals_direct_write(tmp_path, kind, split, n_files):
    e = make_embeddings()
    paths = write_parquet(tmp_path / "emb.parquet", e, kind=kind, split=split, n_files=n_files)
    result = run_import(paths, tmp_path / "imported.h5")
    assert (result.n_rows, result.n_skipped) == (300, 0)
    direct = direct_cache(tmp_path / "direct.h5", e, provenance_of(result.cache_path))
    assert_same_content(result.cache_path, direct)
    with FeatureCache(result.cache_path) as cache:  # validates the whole file
        assert cache.countries[cache.country[5]] == "XX"
        np.testing.assert_array_equal(cache.load_features(np.arange(300)), e.x.astype(np.float16))


@pytest.mark.parametrize("table", ["csv", "parquet"])
def test_npy_and_table_import_equals_direct_write(tmp_path, table):
    e = make_embeddings(d=20, seed=1)
    npy, meta = write_npy(tmp_path / "src", e, table=table)
    result = run_import([npy], tmp_path / "imported.h5", metadata=str(meta))
    assert_same_content(result.cache_path, direct_cache(tmp_path / "direct.h5", e, provenance_of(result.cache_path)))


@pytest.mark.parametrize("keys,id_in_json", [(("lat", "lon"), False), (("latitude", "longitude"), True)])
def test_webdataset_import_equals_direct_write(tmp_path, keys, id_in_json):
    e = make_embeddings(seed=2)
    shards = write_shards(tmp_path / "shards", e, keys=keys, id_in_json=id_in_json,  # [d], [1, d], float64
                          edit=lambda i, meta, x: (meta, [x, x.reshape(1, -1), x.astype(np.float64)][i % 3]))
    result = run_import([str(tmp_path / "shards" / "shard-*.tar")], tmp_path / "imported.h5")
    ids = e.ids if id_in_json else [f"s{i:06d}" for i in range(len(e.ids))]  # else the sample key is the id
    assert_same_content(result.cache_path,
                        direct_cache(tmp_path / "direct.h5", e, provenance_of(result.cache_path), ids=ids))
    assert json.loads(provenance_of(result.cache_path)["imported_from"]) == [str(s) for s in shards]


def test_float32_features_are_stored_as_given(tmp_path):
    e = make_embeddings(n=100)
    paths = write_parquet(tmp_path / "emb.parquet", e)
    result = run_import(paths, tmp_path / "imported.h5", feature_dtype="float32")
    with FeatureCache(result.cache_path) as cache:
        assert cache.feature_dtype == np.float32
    assert_same_content(result.cache_path, direct_cache(tmp_path / "direct.h5", e, provenance_of(result.cache_path),
                                                        feature_dtype="float32"))


def test_provenance_says_imported_from_what(tmp_path):
    e = make_embeddings(n=100)
    [path] = write_parquet(tmp_path / "emb.parquet", e)
    prov = provenance_of(run_import([path], tmp_path / "imported.h5").cache_path)
    import hashlib
    assert prov["backbone"] == "StreetCLIP" and prov["feature_origin"] == "imported"
    assert prov["import_format"] == "parquet"
    assert json.loads(prov["imported_from"]) == [str(path.resolve())]
    assert prov["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "weights" not in prov and "checkpoint_path" not in prov  # never mistaken for geo's own extraction


def test_provenance_checks_accept_the_same_backbone_and_refuse_another(tmp_path):
    """geo evaluate compares provenance without the keys naming which data was read."""
    train, test = make_embeddings(seed=3), make_embeddings(n=120, seed=4)
    p_train = provenance_of(run_import(write_parquet(tmp_path / "train.parquet", train),
                                       tmp_path / "train.h5").cache_path)
    write_shards(tmp_path / "shards", test)
    p_test = provenance_of(run_import([tmp_path / "shards" / "shard-000000.tar"], tmp_path / "test.h5").cache_path)
    p_other = provenance_of(run_import(write_parquet(tmp_path / "o.parquet", test), tmp_path / "other.h5",
                                       backbone="dinov2-L").cache_path)
    assert p_train["source_sha256"] != p_test["source_sha256"]
    assert feature_provenance_differences(p_train, p_test) == []
    assert any(line.startswith("backbone:") for line in feature_provenance_differences(p_train, p_other))
    extracted = feature_provenance_differences(p_train, dict(PROVENANCE, backbone="StreetCLIP"))
    assert any(line.startswith("feature_origin:") for line in extracted)


# ---- splits -----------------------------------------------------------------------


def test_a_source_without_split_gets_the_manifests_hash_split_or_one_split(tmp_path):
    e = make_embeddings(n=400)
    paths = write_parquet(tmp_path / "emb.parquet", e, split=None)
    with FeatureCache(run_import(paths, tmp_path / "hash.h5").cache_path) as cache:
        np.testing.assert_array_equal(cache.split, assign_splits(e.ids, 0.1, 0.1))
    with FeatureCache(run_import(paths, tmp_path / "h2.h5", val_fraction=0.3, test_fraction=0.0).cache_path) as cache:
        np.testing.assert_array_equal(cache.split, assign_splits(e.ids, 0.3, 0.0))
    result = cli_import(paths[0], "--out", tmp_path / "test.h5", "--backbone", "b", "--assign-split", "test")
    assert result.exit_code == 0, result.output
    with FeatureCache(tmp_path / "test.h5") as cache:
        assert (cache.split == 2).all()


def test_assign_split_is_refused_when_the_source_has_one_unless_it_is_ignored(tmp_path):
    e = make_embeddings(n=100)
    paths = write_parquet(tmp_path / "emb.parquet", e)
    result = cli_import(paths[0], "--out", tmp_path / "a.h5", "--backbone", "b", "--assign-split", "test")
    assert result.exit_code == 2 and "the source has a split (column 'split')" in result.output
    result = cli_import(paths[0], "--out", tmp_path / "a.h5", "--backbone", "b", "--assign-split", "test",
                        "--split-column", "")
    assert result.exit_code == 0, result.output


def test_column_options_name_other_columns(tmp_path):
    e = make_embeddings(n=100)
    table = pa.table({"key": e.ids, "latitude": e.lat, "LNG": e.lon, "fold": [SPLIT_NAMES[c] for c in e.split],
                      "clip": pa.array([list(r) for r in e.x], pa.list_(pa.float64()))})
    pq.write_table(table, tmp_path / "t.parquet")
    result = cli_import(tmp_path / "t.parquet", "--out", tmp_path / "a.h5", "--backbone", "StreetCLIP",
                        "--id-column", "key", "--split-column", "fold", "--embedding-column", "clip",
                        "--block-rows", BLOCK)
    assert result.exit_code == 0, result.output  # latitude / LNG found as the defaults' alternatives
    assert_same_content(tmp_path / "a.h5", direct_cache(tmp_path / "d.h5", e, provenance_of(tmp_path / "a.h5")))


# ---- bad input: a skipped row with its reason ------------------------------------------


def test_nan_inf_and_null_embeddings_and_missing_coordinates_are_skipped_with_reasons(tmp_path):
    e = make_embeddings()
    e.x[7, 3] = np.nan
    e.x[130, 0] = np.inf
    e.lat[40] = np.nan
    embedding = pa.array([None if i == 200 else list(r) for i, r in enumerate(e.x)], pa.list_(pa.float32()))
    lon = pa.array([None if i == 250 else v for i, v in enumerate(e.lon)], pa.float64())
    table = pa.table({"id": e.ids, "lat": e.lat, "lon": lon, "split": [SPLIT_NAMES[c] for c in e.split],
                      "embedding": embedding})
    path = tmp_path / "emb.parquet"
    pq.write_table(table, path, row_group_size=70)
    result = run_import([path], tmp_path / "imported.h5")
    where = lambda row: f"{path.resolve()} row {row}"  # noqa: E731
    skipped = {7: f"the embedding has NaN or infinite values: {where(7)}",
               40: f"missing coordinates (lat or lon is null or NaN): {where(40)}",
               130: f"the embedding has NaN or infinite values: {where(130)}",
               200: f"no embedding (null): {where(200)}",
               250: f"missing coordinates (lat or lon is null or NaN): {where(250)}"}
    assert (result.n_rows, result.n_skipped) == (295, 5)
    e.lon[250] = np.nan
    assert_same_content(result.cache_path,
                        direct_cache(tmp_path / "direct.h5", e, provenance_of(result.cache_path), skipped=skipped))


def test_webdataset_samples_without_npy_json_or_coordinates_are_skipped(tmp_path):
    e = make_embeddings(n=120)

    def edit(i, meta, x):
        if i == 3:
            return meta, None  # no .npy
        if i == 50:
            return None, x  # no .json
        if i == 90:
            return {k: v for k, v in meta.items() if k != "lat"}, x
        if i == 100:
            return meta, np.full_like(x, np.nan)
        return meta, x

    write_shards(tmp_path / "shards", e, edit=edit, split=False)
    result = run_import([tmp_path / "shards" / "*.tar"], tmp_path / "imported.h5", assign_split="train")
    assert (result.n_rows, result.n_skipped) == (116, 4)
    with FeatureCache(result.cache_path) as cache:
        reasons = dict(cache.skipped)
    shard = lambda k, r, key: f"{(tmp_path / 'shards' / f'shard-{k:06d}.tar').resolve()} sample {r} (key {key!r})"  # noqa
    assert reasons == {"s000003": f"the sample has no .npy embedding: {shard(0, 3, 's000003')}",
                       "s000050": f"the sample has no .json metadata (no coordinates): {shard(1, 10, 's000050')}",
                       "s000090": f"missing coordinates (lat or lon is null or NaN): {shard(2, 10, 's000090')}",
                       "s000100": f"the embedding has NaN or infinite values: {shard(2, 20, 's000100')}"}


# ---- bad input: a clear error (exit status 2) naming file and row ----------------------


def _table(e: Embeddings, **replace):
    cols = {"id": e.ids, "lat": e.lat, "lon": e.lon, "split": [SPLIT_NAMES[c] for c in e.split],
            "embedding": pa.array([list(r) for r in e.x], pa.list_(pa.float32()))}
    cols.update(replace)
    return pa.table(cols)


def _refused(tmp_path, source, *args, before_work=True, backbone="b"):
    out = tmp_path / "out.h5"
    result = cli_import(*([source] if not isinstance(source, list) else source), "--out", out,
                        *(["--backbone", backbone] if backbone else []), "--block-rows", BLOCK, *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.startswith("Error: ")
    assert not out.exists()
    if before_work:  # refused before anything was written
        assert not partial_path(out).exists()
    return result.output


def test_ragged_parquet_widths_name_file_and_row(tmp_path):
    e = make_embeddings()
    rows = [list(r) for r in e.x]
    rows[150] = rows[150][:-1]
    path = tmp_path / "ragged.parquet"
    pq.write_table(_table(e, embedding=pa.array(rows, pa.list_(pa.float32()))), path, row_group_size=70)
    out = _refused(tmp_path, path, before_work=False)
    assert f"{path.resolve()} row 150: the embedding has 11 values, the first row's has 12" in out


def test_ragged_webdataset_widths_are_refused_before_work(tmp_path):
    e = make_embeddings(n=60)
    write_shards(tmp_path / "s", e, edit=lambda i, meta, x: (meta, np.zeros(13, np.float32) if i == 44 else x))
    out = _refused(tmp_path, tmp_path / "s" / "shard-000002.tar")
    assert "shard-000002.tar sample 4 (key 's000044'): the embedding has 13 values" in out
    assert "sample 0 (key 's000040') has 12" in out


def test_latitude_out_of_range_is_an_error_suggesting_swapped_columns(tmp_path):
    e = make_embeddings()
    lat, lon = e.lat.copy(), e.lon.copy()
    lat[17], lon[17] = e.lon[17] if abs(e.lon[17]) > 90 else 120.5, e.lat[17]
    path = tmp_path / "swapped.parquet"
    pq.write_table(_table(e, lat=lat, lon=lon), path)
    out = _refused(tmp_path, path)
    assert f"{path.resolve()} row 17: lat {float(lat[17])!r} is outside [-90, 90]" in out and "swapped" in out


def test_longitude_out_of_range_is_an_error(tmp_path):
    e = make_embeddings()
    lon = e.lon.copy()
    lon[9] = 200.0
    npy, meta = write_npy(tmp_path / "src", Embeddings(e.ids, e.lat, lon, e.split, e.x))
    out = _refused(tmp_path, npy, "--metadata", meta)
    assert f"{meta.resolve()} line 11 (emb.npy row 9): lon 200.0 is outside [-180, 180]" in out


def test_duplicate_ids_name_both_rows(tmp_path):
    e = make_embeddings()
    ids = list(e.ids)
    ids[210] = ids[33]
    path = tmp_path / "dup.parquet"
    pq.write_table(_table(e, id=ids), path)
    out = _refused(tmp_path, path)
    assert f"{path.resolve()} row 210 repeats id {ids[33]!r} of {path.resolve()} row 33" in out


def test_duplicate_ids_across_shards_name_both_samples(tmp_path):
    e = make_embeddings(n=60)
    write_shards(tmp_path / "s", e, id_in_json=True,
                 edit=lambda i, meta, x: (dict(meta, id=e.ids[2]) if i == 45 else meta, x))
    out = _refused(tmp_path, str(tmp_path / "s" / "*.tar"))
    assert "shard-000002.tar sample 5 (key 's000045') repeats id 'photo/0/00002' of" in out
    assert "shard-000000.tar sample 2 (key 's000002')" in out


@pytest.mark.parametrize("problem,expected", [
    ("split", "row 4: split 'holdout' is not train, val or test"),
    ("id", "row 8: the id is missing"),
    ("lat", "row 6: lat is not a number: 'north'"),
])
def test_bad_metadata_is_refused_before_work(tmp_path, problem, expected):
    e = make_embeddings(n=100)
    split = [SPLIT_NAMES[c] for c in e.split]
    replace = {"split": [("holdout" if i == 4 else s) for i, s in enumerate(split)],
               "id": [(None if i == 8 else s) for i, s in enumerate(e.ids)],
               "lat": [("north" if i == 6 else str(v)) for i, v in enumerate(e.lat)]}
    path = tmp_path / "bad.parquet"
    pq.write_table(_table(e, **{problem: replace[problem]}), path)
    assert expected in _refused(tmp_path, path)


def test_npy_and_table_of_different_lengths_are_refused(tmp_path):
    e = make_embeddings(n=100)
    npy, meta = write_npy(tmp_path / "src", e, table="parquet")
    np.save(npy, e.x[:99])
    out = _refused(tmp_path, npy, "--metadata", meta)
    assert "has 100 rows but" in out and "holds 99 embeddings" in out


def test_missing_columns_and_options_are_named(tmp_path):
    e = make_embeddings(n=50)
    path = tmp_path / "t.parquet"
    pq.write_table(_table(e).drop_columns(["lat"]), path)
    assert "no lat column 'lat' or 'latitude'" in _refused(tmp_path, path)
    pq.write_table(_table(e), path)
    assert "name it with --embedding-column" in _refused(tmp_path, path, "--embedding-column", "clip")
    npy, _ = write_npy(tmp_path / "src", e)
    assert "needs --metadata TABLE" in _refused(tmp_path, npy)
    assert "no file matches" in _refused(tmp_path, str(tmp_path / "none-*.tar"))


def test_float16_overflow_names_the_row_and_the_option(tmp_path):
    e = make_embeddings()
    e.x[222, 4] = 1e6
    path = tmp_path / "big.parquet"
    write_parquet(path, e)
    out = _refused(tmp_path, path, before_work=False)
    assert f"{path.resolve()} row 222: the embedding has a value of magnitude 1e+06" in out
    assert "--feature-dtype float32" in out


def test_an_existing_cache_needs_overwrite(tmp_path):
    e = make_embeddings(n=50)
    [path] = write_parquet(tmp_path / "emb.parquet", e)
    run_import([path], tmp_path / "out.h5")
    with pytest.raises(CacheError, match="already exists; pass --overwrite"):
        run_import([path], tmp_path / "out.h5")
    run_import([path], tmp_path / "out.h5", overwrite=True)


# ---- resumption ------------------------------------------------------------------------

_KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import geo.cache.writer as writer
from geo.cache.importer import ImportConfig, import_embeddings
from geo.pipeline.countries import country_codes
from geo.pipeline.manifest import assign_splits

blocks = 0
if {mid_block!r}:  # die after the 4th block's rows are flushed, before its commit record
    digest = writer.block_digest
    def dying_digest(*a, **k):
        global blocks
        blocks += 1
        if blocks == 4:
            os.kill(os.getpid(), signal.SIGKILL)
        return digest(*a, **k)
    writer.block_digest = dying_digest
hook = None if {mid_block!r} else (lambda n: n == 3 and os.kill(os.getpid(), signal.SIGKILL))
import_embeddings({sources!r}, {out!r}, ImportConfig(backbone="StreetCLIP", block_rows={block}, {extra}),
                  country_fn=country_codes, split_fn=assign_splits, show_progress=False, _after_block=hook)
"""


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["parquet", "npy", "webdataset"])
@pytest.mark.parametrize("mid_block", [False, True], ids=["after-commit", "mid-block"])
def test_a_killed_import_resumes_to_the_identical_cache(tmp_path, fmt, mid_block):
    e = make_embeddings(n=500)
    e.x[300, 1] = np.nan  # a skipped row after the kill
    extra, args = "", []
    if fmt == "parquet":
        sources = [str(p) for p in write_parquet(tmp_path / "emb.parquet", e, split=None)]
    elif fmt == "npy":
        npy, meta = write_npy(tmp_path / "src", e)
        sources, extra, args = [str(npy)], f"metadata={str(meta)!r}", ["--metadata", meta]
    else:
        sources = [str(tmp_path / "shards" / "*.tar")]
        write_shards(tmp_path / "shards", e)
    out = tmp_path / "killed.h5"
    script = _KILL_SCRIPT.format(repo=str(REPO), mid_block=mid_block, sources=sources, out=str(out), block=BLOCK,
                                 extra=extra)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists()
    with h5py.File(partial_path(out), "r") as f:
        assert int(f.attrs["rows_done"]) == 3 * BLOCK
    result = cli_import(*sources, "--out", out, "--backbone", "StreetCLIP", "--block-rows", BLOCK, *args)
    assert result.exit_code == 0, result.output
    assert "499 rows, 1 skipped" in result.output
    whole = run_import(sources, tmp_path / "whole.h5", **({"metadata": str(args[1])} if args else {}))
    assert_same_content(out, whole.cache_path)


def test_a_partial_of_another_source_is_not_resumed(tmp_path):
    e = make_embeddings(n=300)
    [path] = write_parquet(tmp_path / "emb.parquet", e)
    out = tmp_path / "out.h5"

    def stop(n):
        if n == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        import_embeddings([str(path)], out, ImportConfig(backbone="b", block_rows=BLOCK), country_fn=country_codes,
                          split_fn=assign_splits, show_progress=False, _after_block=stop)
    e.x[0, 0] += 1
    write_parquet(path, e)
    with pytest.raises(CacheError, match="provenance 'source_sha256' is"):
        run_import([path], out, backbone="b")
    assert run_import([path], out, backbone="b", overwrite=True).n_rows == 300


def test_library_errors_are_manifest_errors(tmp_path):
    e = make_embeddings(n=50)
    ids = list(e.ids)
    ids[1] = ids[0]
    pq.write_table(_table(e, id=ids), tmp_path / "d.parquet")
    with pytest.raises(ManifestError, match="row 1 repeats id"):
        run_import([tmp_path / "d.parquet"], tmp_path / "o.h5", columns=Columns())


# ---- the readers themselves ------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "npy", "webdataset"])
def test_blocks_from_any_start_row_are_the_source_rows(tmp_path, fmt):
    """What a resumed import reads: from any row (mid row group, mid shard, at a file boundary), in blocks."""
    from geo.cache.sources import open_source

    e = make_embeddings(n=230, d=5)
    if fmt == "parquet":
        paths = write_parquet(tmp_path / "e.parquet", e, n_files=3, row_group_size=30)
        sources, metadata = [str(p) for p in paths], None
    elif fmt == "npy":
        npy, meta = write_npy(tmp_path / "src", e)
        sources, metadata = [str(npy)], str(meta)
    else:
        write_shards(tmp_path / "s", e)
        sources, metadata = [str(tmp_path / "s" / "*.tar")], None
    source = open_source(sources, metadata=metadata)
    rows = source.scan()
    assert rows.feature_dim == 5 and len(rows) == 230
    for start in (0, 1, 29, 77, 154, 229, 230):
        for block_rows in (1, 16, 64, 500):
            got = list(source.blocks(start, block_rows, 5))
            assert [lo for lo, _, _ in got] == list(range(start, 230, block_rows))
            assert all(len(x) == min(block_rows, 230 - lo) for lo, x, _ in got)
            x = np.concatenate([x for _, x, _ in got]) if got else np.zeros((0, 5), np.float32)
            np.testing.assert_array_equal(x, e.x[start:])


# ---- --like: a test set for the same model ----------------------------------------------


def test_like_takes_the_backbone_of_an_imported_cache_and_checks_the_width(tmp_path):
    from geo.errors import ConfigError
    from geo.pipeline.like import like_settings
    from support.caches import make_rows, write_cache

    train = run_import(write_parquet(tmp_path / "train.parquet", make_embeddings()), tmp_path / "train.h5").cache_path
    test = make_embeddings(n=80, seed=5)
    npy, meta = write_npy(tmp_path / "src", test)
    result = cli_import(npy, "--metadata", meta, "--out", tmp_path / "test.h5", "--like", train,
                        "--assign-split", "test", "--split-column", "")
    assert result.exit_code == 0, result.output
    assert provenance_of(tmp_path / "test.h5")["backbone"] == "StreetCLIP"
    assert feature_provenance_differences(provenance_of(train), provenance_of(tmp_path / "test.h5")) == []

    wide = make_embeddings(n=80, d=13)
    npy, meta = write_npy(tmp_path / "wide", wide)
    out = _refused(tmp_path, [npy, "--metadata", meta, "--like", train], backbone=None)
    assert "the source's embeddings have 13 values" in out and "features 12" in out
    out = _refused(tmp_path, [npy, "--metadata", meta, "--like", train], backbone="other")
    assert "--backbone 'other' differs from --like" in out
    extracted = write_cache(tmp_path / "extracted.h5", make_rows(d=12))
    out = _refused(tmp_path, [npy, "--metadata", meta, "--like", extracted], backbone=None)
    assert "was not imported (backbone 'wide_resnet50_2'" in out
    with pytest.raises(ConfigError, match="its provenance lacks weights, checkpoint_path"):
        like_settings(train)  # `geo extract --like` needs a geo backbone checkpoint


def test_backbone_is_required(tmp_path):
    [path] = write_parquet(tmp_path / "emb.parquet", make_embeddings(n=20))
    result = CliRunner().invoke(cli, ["cache", "import", str(path), "--out", str(tmp_path / "o.h5")])
    assert result.exit_code == 2 and "--backbone NAME" in result.output


@pytest.mark.slow
def test_a_run_on_an_imported_cache_evaluates_on_an_imported_test_set_of_the_same_backbone(tmp_path):
    """End to end: fit-head on an import; geo evaluate accepts a test set imported --like it, refuses another model's."""
    from geo.errors import ConfigError
    from geo.training.config import FitConfig
    from geo.training.evaluate import evaluate_run
    from geo.training.fit import fit_head

    train = run_import(write_parquet(tmp_path / "train.parquet", make_embeddings(n=600)), tmp_path / "train.h5")
    run = tmp_path / "run"
    fit_head(train.cache_path, FitConfig(head="softmax", n_cells=16, batch_size=128, epochs=1, precision="fp32",
                                         device="cpu"), run, progress=False)
    write_shards(tmp_path / "shards", make_embeddings(n=90, seed=7), split=False)
    result = cli_import(str(tmp_path / "shards" / "*.tar"), "--out", tmp_path / "test.h5", "--like", train.cache_path,
                        "--assign-split", "test")
    assert result.exit_code == 0, result.output
    assert evaluate_run(run, cache_path=tmp_path / "test.h5", n_bootstrap=0)["n"] == 90
    other = run_import([tmp_path / "shards" / "*.tar"], tmp_path / "other.h5", backbone="dinov2-L",
                       assign_split="test")
    with pytest.raises(ConfigError, match="backbone: 'StreetCLIP' -> 'dinov2-L'"):
        evaluate_run(run, cache_path=other.cache_path)


def test_parquet_blocks_hold_one_batch_of_arrow_memory(tmp_path):
    """Streaming means bounded: reading 40 row groups holds about one block, not every row group read so far."""
    from geo.cache.sources import open_source

    e = make_embeddings(n=8000, d=64)
    [path] = write_parquet(tmp_path / "e.parquet", e, kind="fixed", row_group_size=200)  # 40 groups of 51 KiB
    source = open_source([str(path)])
    rows = source.scan()
    pool = pa.default_memory_pool()
    before, peak = pool.bytes_allocated(), 0
    for _, x, _ in source.blocks(0, 200, rows.feature_dim):
        peak = max(peak, pool.bytes_allocated() - before)
    assert 0 < peak < 8 * 200 * 64 * 4  # the whole file is 40 x that
