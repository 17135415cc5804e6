"""``geo cache import``: embeddings made elsewhere -> a ``geo-feature-cache/1`` file, without re-extracting.

Two passes over the source (``geo.cache.sources``): the first reads every row's
id, lat, lon and split (never an embedding's values) and the sha256 of the source
files, and refuses, before anything is written, a source with bad metadata: a
missing or empty id, a duplicate id (both rows named), a latitude outside
[-90, 90] or a longitude outside [-180, 180] (the columns are probably swapped, or
not degrees: the whole source is suspect, so this is an error, not a skipped row),
a split that is not train / val / test, a table whose length differs from the
``.npy``'s. The second pass streams the embeddings in blocks of ``block_rows`` input
rows into ``CacheWriter`` (committed, checksummed blocks under ``<out>.partial``,
renamed when complete), exactly as ``geo extract`` does: a killed import resumes at
the writer's ``rows_done`` when rerun with the same options and ends with the
same file. Rows that cannot be imported are skipped and listed in ``/skipped`` with
their reason and place: missing coordinates (null or NaN lat/lon, or a sample
without its ``.json``), a missing embedding, an embedding with NaN or infinite
values. Embeddings of ragged width stop the import with the file and row.

Countries (``/country``) come from ``country_fn`` (lat, lon -> ISO codes), passed in
by the caller (the CLI gives ``geo.pipeline.countries.country_codes``, the labelling
``geo extract`` uses; the cache package may not import the pipeline): the cache's
``countries`` are the sorted codes of all importable rows, as extract's are. A
source without a split column gets ``assign_split``: every row one split, or
"hash": ``split_fn(ids, val_fraction, test_fraction)`` (the CLI gives
``geo.pipeline.manifest.assign_splits``: the split follows a hash of the id, as for
manifests without a split, so an id lands in the same split however its cache is
made).

Provenance (root attributes): ``backbone`` (the user's name for the model that made
the embeddings) and ``feature_origin`` = "imported" describe the features; which data
was read is ``imported_from`` (the source files), ``import_format``,
``source_sha256`` and ``import_options`` (columns, split rule), which evaluation
ignores like a manifest's hash (``geo.training.runs.MANIFEST_PROVENANCE_KEYS``): a
test set imported with the same backbone name is accepted by ``geo evaluate``, a
cache of another backbone, or one extracted by geo, is refused. ``like`` takes the
backbone name from a cache imported before and requires the same width.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from geo.cache.schema import FEATURE_DTYPES, FLOAT16_MAX, SPLIT_NAMES, partial_path
from geo.cache.sources import Columns, Problems, SourceRows, open_source
from geo.cache.writer import CacheWriter
from geo.errors import CacheError, ConfigError, ManifestError

CountryFn = Callable[[np.ndarray, np.ndarray], Sequence[str]]
SplitFn = Callable[[list, float, float], np.ndarray]
ASSIGN_SPLITS = ("hash", *SPLIT_NAMES)
DEFAULT_BLOCK_ROWS = 8192


@dataclass
class ImportConfig:
    """Every option of ``geo cache import``."""

    backbone: str | None = None  # the user's name for the model that made the embeddings
    like: str | None = None  # a cache imported before: its backbone (and width) for this one, e.g. a test set
    format: str = "auto"  # auto (by extension), parquet, npy, webdataset
    metadata: str | None = None  # the table beside a .npy source
    columns: Columns = field(default_factory=Columns)
    assign_split: str = "hash"  # for a source without a split: hash (of the id), train, val or test
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    feature_dtype: str = "float16"
    block_rows: int = DEFAULT_BLOCK_ROWS
    overwrite: bool = False


@dataclass
class ImportResult:
    cache_path: Path
    n_rows: int
    n_skipped: int
    provenance: dict


def like_backbone(config: ImportConfig) -> tuple[str, int | None]:
    """(backbone name, feature_dim the source must have) from ``config.like`` or ``config.backbone``."""
    if config.like is None:
        return config.backbone, None
    from geo.cache.reader import FeatureCache

    path = Path(config.like).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"--like {path}: no such cache")
    with FeatureCache(path, validate=False) as cache:
        provenance, dim = dict(cache.provenance), cache.feature_dim
    if provenance.get("feature_origin") != "imported":
        raise ConfigError(f"--like {path}: was not imported (backbone {provenance.get('backbone')!r}, made by geo "
                          "extract); embeddings made elsewhere are not its features. Name their model with --backbone")
    if config.backbone is not None and config.backbone != provenance.get("backbone"):
        raise ConfigError(f"--backbone {config.backbone!r} differs from --like {path}'s "
                          f"{provenance.get('backbone')!r}; give one of them")
    return str(provenance["backbone"]), dim


def _check_config(config: ImportConfig, split_fn: SplitFn | None) -> None:
    if not str(config.backbone or "").strip():
        raise ConfigError("--backbone (or --like an imported cache): name the model that made the embeddings "
                          "(e.g. StreetCLIP, open_clip/ViT-L-14:openai); it is the cache's provenance")
    if config.feature_dtype not in FEATURE_DTYPES:
        raise ConfigError(f"--feature-dtype {config.feature_dtype!r}: choose {' or '.join(FEATURE_DTYPES)}")
    if config.block_rows < 1:
        raise ConfigError(f"--block-rows {config.block_rows}: must be at least 1")
    if config.assign_split not in ASSIGN_SPLITS:
        raise ConfigError(f"--assign-split {config.assign_split!r}: choose {', '.join(ASSIGN_SPLITS)}")
    if config.assign_split == "hash" and split_fn is not None:
        split_fn([], config.val_fraction, config.test_fraction)  # bad fractions fail before any reading


def first_duplicate(ids: pa.ChunkedArray) -> tuple[int, int, int] | None:
    """(first row, row that repeats it, number of repeated rows) of the earliest repeated id, or None."""
    counts = pc.value_counts(ids)
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(repeated) == 0:
        return None
    many = pc.filter(counts.field("counts"), pc.greater(counts.field("counts"), 1))
    extra = int(pc.sum(pc.subtract(many, 1)).as_py())
    rows = np.flatnonzero(pc.is_in(ids, value_set=repeated).to_numpy(zero_copy_only=False))
    seen: dict[str, int] = {}
    for lo in range(0, len(rows), 1 << 16):
        part = rows[lo:lo + (1 << 16)]
        for row, ident in zip(part.tolist(), ids.take(pa.array(part)).to_pylist()):
            if ident in seen:
                return seen[ident], row, extra
            seen[ident] = row
    raise AssertionError("value_counts found a repeated id that is_in did not")  # pragma: no cover


def check_rows(rows: SourceRows, where: Callable[[int], str]) -> tuple[np.ndarray, np.ndarray]:
    """Refuse duplicate ids and out-of-range coordinates (ManifestError).

    Returns (lon_deg [n] wrapped into [-180, 180), bool [n]: the row has both coordinates).
    """
    dup = first_duplicate(rows.ids)
    if dup is not None:
        a, b, extra = dup
        raise ManifestError(f"{where(b)} repeats id {rows.ids[b].as_py()!r} of {where(a)} "
                            f"({extra} repeated row(s) in all); ids must be unique")
    lat, lon = rows.lat_deg, rows.lon_deg
    has = ~(np.isnan(lat) | np.isnan(lon))
    problems = Problems(where)
    problems.add(has & ~(np.abs(lat) <= 90.0),
                 lambda row: f"lat {float(lat[row])!r} is outside [-90, 90] (lon {float(lon[row])!r}): are lat and lon "
                             "swapped, or not in degrees? name the columns with --lat-column / --lon-column")
    problems.add(has & (np.abs(lat) <= 90.0) & ~(np.abs(lon) <= 180.0),
                 lambda row: f"lon {float(lon[row])!r} is outside [-180, 180] (lat {float(lat[row])!r}); "
                             "give longitudes in degrees east in [-180, 180]")
    problems.raise_if_any("coordinates out of range (nothing was imported)")
    return np.where(lon >= 180.0, lon - 360.0, lon), has


def label_countries(lat: np.ndarray, lon: np.ndarray, has: np.ndarray, country_fn: CountryFn
                    ) -> tuple[list[str], np.ndarray]:
    """(the cache's countries: sorted codes of the rows with coordinates, int16 [n] index per row, -1 without)."""
    codes = np.asarray(country_fn(lat[has], lon[has])).astype("<U8")
    countries = sorted(set(np.unique(codes).tolist()))
    index = np.full(len(lat), -1, dtype=np.int16)
    index[has] = np.searchsorted(countries, codes).astype(np.int16)
    return countries, index


def resolve_splits(rows: SourceRows, config: ImportConfig, split_fn: SplitFn | None,
                   *, explicit_assign: bool = False) -> tuple[np.ndarray, str]:
    """(uint8 [n] split codes, how they were chosen)."""
    if rows.split is not None:
        if explicit_assign:
            raise ConfigError(f"the source has a split ({rows.split_from}); drop --assign-split, or pass "
                              "--split-column '' to ignore the source's split")
        return rows.split, f"from the source's {rows.split_from}"
    if config.assign_split != "hash":
        return np.full(len(rows), SPLIT_NAMES.index(config.assign_split), dtype=np.uint8), \
            f"all {config.assign_split} (--assign-split)"
    if split_fn is None:
        raise ConfigError("the source has no split: pass split_fn (geo.pipeline.manifest.assign_splits) or "
                          "assign_split='train', 'val' or 'test'")
    codes = np.zeros(len(rows), dtype=np.uint8)
    step = 1 << 18
    for lo in range(0, len(rows), step):  # ids as Python strings a slice at a time
        codes[lo:lo + step] = split_fn(rows.ids.slice(lo, step).to_pylist(), config.val_fraction, config.test_fraction)
    return codes, (f"by a hash of the id (val {config.val_fraction:g}, test {config.test_fraction:g}; "
                   "as geo manifests without a split)")


def import_provenance(source, rows: SourceRows, config: ImportConfig, split_rule: str) -> dict:
    """The cache's provenance: what made the features, and (ignored by evaluation) which data was read."""
    columns = {k: v for k, v in vars(config.columns).items() if v is not None}
    options = {"format": source.format, "columns": columns, "split": split_rule}
    return {"backbone": str(config.backbone).strip(), "feature_origin": "imported",
            "imported_from": json.dumps([str(p) for p in rows.files]), "import_format": source.format,
            "source_sha256": rows.sha256, "import_options": json.dumps(options, sort_keys=True)}


def _skip_reason(row: int, rows: SourceRows, has: np.ndarray, missing: bool, finite: bool, where) -> str | None:
    reason = rows.skip_reason.get(row)
    if reason is None and not has[row]:
        reason = "missing coordinates (lat or lon is null or NaN)"
    if reason is None and missing:
        reason = "no embedding (null)"
    if reason is None and not finite:
        reason = "the embedding has NaN or infinite values"
    return None if reason is None else f"{reason}: {where(row)}"


def import_embeddings(sources: Sequence[str], out: str | Path, config: ImportConfig, *,
                      country_fn: CountryFn, split_fn: SplitFn | None = None, explicit_assign: bool = False,
                      show_progress: bool = True, _after_block: Callable[[int], None] | None = None) -> ImportResult:
    """Import embeddings made elsewhere into the cache ``out``; see the module docstring.

    Args:
        sources: files or glob patterns (Parquet files, one .npy, or tar shards).
        out: the cache to write (``<out>.partial`` until complete; an unfinished one resumes).
        config: the options (``ImportConfig``).
        country_fn: lat_deg [m], lon_deg [m] -> ISO alpha-2 codes [m] ("XX" = none).
        split_fn: ids, val_fraction, test_fraction -> uint8 codes; for ``assign_split="hash"``.
        explicit_assign: the user gave ``--assign-split`` (refused when the source has a split).
        _after_block: test hook, called with the number of blocks committed by this process.
    Raises:
        ConfigError (options), ManifestError (the source: file and row named), CacheError (the output).
    """
    backbone, like_dim = like_backbone(config)
    config = replace(config, backbone=backbone)
    _check_config(config, split_fn)
    out = Path(out).expanduser().resolve()
    if out.exists() and not config.overwrite:
        raise CacheError(f"{out} already exists; pass --overwrite to replace it")
    source = open_source(list(sources), fmt=config.format, metadata=config.metadata, columns=config.columns)
    total_bytes = sum(p.stat().st_size for p in getattr(source, "paths", [])) or None
    with tqdm(total=total_bytes, desc="check", unit="B", unit_scale=True, unit_divisor=1024,
              disable=not show_progress, leave=False) as bar:
        rows = source.scan(hash_progress=bar.update)
    if like_dim is not None and rows.feature_dim != like_dim:
        raise ConfigError(f"the source's embeddings have {rows.feature_dim} values, --like {config.like}'s "
                          f"features {like_dim}: not the same model")
    lon, has = check_rows(rows, source.where)
    split, split_rule = resolve_splits(rows, config, split_fn, explicit_assign=explicit_assign)
    countries, country = label_countries(rows.lat_deg, lon, has, country_fn)
    provenance = import_provenance(source, rows, config, split_rule)
    n, d = len(rows), rows.feature_dim
    scan_skip = np.zeros(n, dtype=bool)
    scan_skip[list(rows.skip_reason)] = True
    if partial_path(out).exists() and not config.overwrite and show_progress:
        tqdm.write(f"resuming {partial_path(out)}")
    with CacheWriter(out, feature_dim=d, countries=countries, provenance=provenance,
                     feature_dtype=config.feature_dtype, overwrite=config.overwrite) as writer:
        bar = tqdm(total=n, initial=writer.rows_done, desc="import", unit="row", unit_scale=True,
                   disable=not show_progress, leave=False)
        blocks = 0
        for lo, x, missing in source.blocks(writer.rows_done, config.block_rows, d):
            b = len(x)
            sl = slice(lo, lo + b)
            finite = np.isfinite(x).all(axis=1)
            keep = finite & has[sl] & ~missing & ~scan_skip[sl]
            ids = rows.ids.slice(lo, b).to_pylist()
            skipped = [(ids[i], _skip_reason(lo + i, rows, has, bool(missing[i]), bool(finite[i]), source.where))
                       for i in np.flatnonzero(~keep)]
            kept = np.flatnonzero(keep)
            if config.feature_dtype == "float16" and kept.size:
                peak = np.abs(x[kept]).max(axis=1)
                over = np.flatnonzero(peak > FLOAT16_MAX)
                if over.size:
                    row = lo + int(kept[over[0]])
                    raise ManifestError(f"{source.where(row)}: the embedding has a value of magnitude "
                                        f"{float(peak[over[0]]):.6g}, beyond float16's {FLOAT16_MAX:g}; "
                                        "pass --feature-dtype float32 (and --overwrite)")
            if kept.size == b:  # the common case: no copies
                kept, kept_ids = slice(None), ids
            else:
                kept_ids = [ids[i] for i in kept]
            writer.write_block(features=x[kept], ids=kept_ids, lat_deg=rows.lat_deg[sl][kept],
                               lon_deg=lon[sl][kept], split=split[sl][kept], country=country[sl][kept],
                               skipped=skipped, rows_consumed=b)
            bar.update(b)
            blocks += 1
            if _after_block is not None:
                _after_block(blocks)
        bar.close()
        if writer.rows_done != n:
            raise CacheError(f"{partial_path(out)}: {writer.rows_done} input rows imported of {n}; the source "
                             "changed while it was read, or the .partial belongs to another source")
        n_rows = writer.n_rows
        path = writer.finalize()
    return ImportResult(path, n_rows, n - n_rows, provenance)
