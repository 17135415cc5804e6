"""The summary ``geo cache info FILE`` prints: contents, provenance and a validation verdict.

Works on broken files too (it reports what it can and lists the problems), and on
an unfinished ``.partial`` file (it says so, with the rows written so far).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from geo.cache.reader import open_cache_file
from geo.cache.schema import SPLIT_NAMES, is_partial_name, read_attr, read_countries, read_provenance
from geo.cache.validate import check_schema, find_problems

TOP_COUNTRIES = 10


def _size(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n_bytes < 1024 or unit == "TiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return ""


def _contents(f: h5py.File, n_rows: int) -> list[str]:
    """Lines on rows, features, splits, countries and skipped rows (the datasets that exist)."""
    lines = [f"rows:        {n_rows}"]
    if "features" in f and f["features"].ndim == 2:
        ds = f["features"]
        lines.append(f"features:    dim {ds.shape[1]}, {ds.dtype}, "
                     f"{_size(n_rows * ds.shape[1] * ds.dtype.itemsize)}")
    if "split" in f:
        codes = np.bincount(f["split"][:n_rows].astype(np.int64), minlength=len(SPLIT_NAMES))
        names = list(SPLIT_NAMES) + [f"code {i}" for i in range(len(SPLIT_NAMES), codes.size)]
        lines.append("splits:      " + ", ".join(f"{name} {int(c)}" for name, c in zip(names, codes)))
    countries = read_countries(f)
    if "country" in f:
        index = f["country"][:n_rows].astype(np.int64)
        known = (index >= 0) & (index < len(countries))
        counts = np.bincount(index[known], minlength=len(countries))
        order = [i for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
        top = ", ".join(f"{countries[i]} {int(counts[i])}" for i in order[:TOP_COUNTRIES])
        rest = int(counts[order[TOP_COUNTRIES:]].sum()) if len(order) > TOP_COUNTRIES else 0
        lines.append(f"countries:   {len(order)} present of {len(countries)} listed: {top}"
                     + (f", {len(order) - TOP_COUNTRIES} others {rest}" if rest else "")
                     + (f", bad index {int((~known).sum())}" if (~known).any() else ""))
    if "skipped" in f:
        k = int(f.attrs.get("skipped_committed", f["skipped"].shape[0]))
        lines.append(f"skipped:     {k} input rows could not be read")
    return lines


def _provenance(f: h5py.File) -> list[str]:
    items = dict(read_provenance(f))
    for key in ("created", "geo_version"):
        if key in f.attrs:
            items[key] = read_attr(f.attrs, key)
    if not items:
        return ["provenance:  (none recorded)"]
    width = max(len(k) for k in items)
    return ["provenance:"] + [f"  {k.ljust(width)}  {v}" for k, v in items.items()]


def cache_report(path: str | Path) -> tuple[str, bool]:
    """(the text of ``cache_info``, True when the file is a valid, complete cache).

    CacheError when the file is missing or not HDF5 at all.
    """
    path = Path(path)
    with open_cache_file(path) as f:
        lines = [f"file:        {path}"]
        schema = read_attr(f.attrs, "schema") if "schema" in f.attrs else "(missing)"
        lines.append(f"schema:      {schema}")
        unfinished = False
        if check_schema(f):
            problems = find_problems(f)
        else:
            unfinished = is_partial_name(path) or not f.attrs.get("complete", True)
            n_rows = (int(f.attrs.get("rows_committed", 0)) if unfinished
                      else f["features"].shape[0] if "features" in f and f["features"].ndim == 2 else 0)
            if unfinished:
                lines.append(f"status:      INCOMPLETE: an unfinished write, {n_rows} rows committed, "
                             f"{int(f.attrs.get('rows_done', 0))} input rows done so far; "
                             "rerun the command that writes it to resume")
            else:
                lines.append("status:      complete")
            lines += _contents(f, n_rows)
            lines += _provenance(f)
            problems = find_problems(f, n_rows=n_rows if unfinished else None)
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        if unfinished:
            lines.append(f"verdict:     INCOMPLETE, not a finished cache ({count} in the committed rows)")
        elif problems:
            lines.append(f"verdict:     INVALID ({count})")
        else:
            lines.append("verdict:     valid")
        lines += [f"  - {p}" for p in problems]
    return "\n".join(lines), not problems and not unfinished


def cache_info(path: str | Path) -> str:
    """A readable summary of a cache file: schema, rows, features, splits, countries, provenance, verdict."""
    return cache_report(path)[0]
