"""Maps of a report: predicted densities for a few test images, the partition, the MvMF means.

Heads are re-created from each run's ``checkpoint.pt`` (``geo.training.runs.load_head``,
the selected weights) and fed the images' cached features
(``FeatureCache.load_features``). Images are chosen from one reference run's
``predictions.parquet`` by its top-1 probability: the most and the least certain.

What a density map shows: the probability mass of each 1° pixel (log10,
``geo.worldmap.density.pixel_log10_mass``, shared with ``geo predict --map``). Each drawn pixel is the maximum of its 5 x 5
neighbourhood, so that single-pixel peaks stay visible at report size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from geo.geometry import xyz_to_latlon
from geo.reports.runs import Run, pick_one
from geo.training import runs as run_files
from geo.worldmap.density import pixel_log10_mass
from geo.worldmap.world import draw_world, lat_lon_grid

DECADES = 6  # colour range of the density maps below each map's maximum


@dataclass
class LoadedRun:
    """A run with its head (selected weights, eval mode, CPU) and partition re-created."""

    run: Run
    head: torch.nn.Module
    partition: object
    predictions: dict  # column -> np.ndarray (topk_* are [n, k])

    @property
    def label(self) -> str:
        kappa = f" κ0={self.run.kappa0:g}" if self.run.kappa0 is not None else ""
        return f"{self.run.head} c={self.run.n_cells}{kappa}"


def load_run(run: Run) -> LoadedRun:
    """Re-create ``run``'s head and partition from checkpoint.pt; ValueError(reason) when it cannot."""
    import pyarrow.parquet as pq

    for path in (run.checkpoint_path, run.predictions_path):
        if not path.exists():
            raise ValueError(f"{run.name}: no {path.name}")
    try:
        loaded = run_files.load_head(run.path)
        head, partition = loaded.head, loaded.partition
        table = pq.read_table(run.predictions_path)
    except Exception as err:  # a foreign or torn file: reported as a reason, never fatal to the report
        raise ValueError(f"{run.name}: cannot re-create the head ({type(err).__name__}: {err})") from None
    predictions = {}
    for name in table.column_names:
        column = table.column(name)
        values = column.to_pylist() if name == "id" else column.to_numpy(zero_copy_only=False)
        predictions[name] = np.stack(values) if name.startswith("topk_") else np.asarray(values)
    return LoadedRun(run, head, partition, predictions)


def select_images(predictions: dict, n_images: int) -> list[tuple[int, str]]:
    """Rows of the most and the least certain test images by top-1 probability, with a label."""
    top1 = np.asarray(predictions["topk_prob"])[:, 0]
    order = np.argsort(-top1, kind="stable")
    n_most = min(len(order), (n_images + 1) // 2)
    n_least = min(len(order) - n_most, n_images - n_most)
    picked = [(int(i), f"most certain #{r + 1}") for r, i in enumerate(order[:n_most])]
    picked += [(int(i), f"least certain #{r + 1}") for r, i in enumerate(order[::-1][:n_least])]
    return picked


def load_features(cache_path: str | Path, ids: list[str]) -> np.ndarray:
    """Cached features float32 [len(ids), d] of the images ``ids`` (ValueError if one is missing)."""
    from geo.cache.store import FeatureCache

    with FeatureCache(cache_path, validate=False) as cache:
        cache_ids = np.asarray(cache.ids).astype(str)
        rows = np.flatnonzero(np.isin(cache_ids, ids))
        where = {cache_ids[r]: int(r) for r in rows}
        missing = [i for i in ids if i not in where]
        if missing:
            raise ValueError(f"{cache_path}: has no rows for test images {', '.join(missing[:3])}")
        wanted = np.array([where[i] for i in ids])
        order = np.argsort(wanted)  # h5py reads rows in increasing order
        features = np.empty((len(ids), cache.feature_dim), np.float32)
        features[order] = cache.load_features(wanted[order]).astype(np.float32)
    return features


def _max_filter(values: np.ndarray, radius: int = 2) -> np.ndarray:
    """Maximum over each pixel's (2 radius + 1)^2 neighbourhood (longitude wraps, latitude does not)."""
    padded = np.pad(values, ((radius, radius), (0, 0)), constant_values=-np.inf)
    n_rows = values.shape[0]
    rows = np.max([padded[i:i + n_rows] for i in range(2 * radius + 1)], axis=0)
    return np.max([np.roll(rows, shift, axis=1) for shift in range(-radius, radius + 1)], axis=0)


def density_figure(loaded: list[LoadedRun], images: list[tuple[str, str]], features: dict[str, np.ndarray],
                   background: bool = True) -> Figure:
    """Rows: images (id, label); columns: runs. True location ★ (green), prediction × (red)."""
    fig = Figure(figsize=(4.6 * len(loaded) + 1.0, 2.5 * len(images) + 0.4), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(images), len(loaded), squeeze=False))
    image = None
    for col, entry in enumerate(loaded):
        row_of = {image_id: i for i, image_id in enumerate(entry.predictions["id"])}
        with torch.no_grad():
            logits = entry.head(torch.as_tensor(features[entry.run.name]))
        for row, (image_id, label) in enumerate(images):
            ax, i = axes[row, col], row_of[image_id]
            log_mass = _max_filter(pixel_log10_mass(entry.head, logits[row]))
            top = np.nanmax(log_mass[np.isfinite(log_mass)]) if np.isfinite(log_mass).any() else 0.0
            draw_world(ax, background=background, background_alpha=0.3)
            image = ax.imshow(np.ma.masked_less(log_mass - top, -DECADES), extent=(-180, 180, -90, 90),
                              origin="lower", cmap="inferno", vmin=-DECADES, vmax=0, alpha=0.85, zorder=2)
            p = entry.predictions
            ax.plot(p["lon"][i], p["lat"][i], marker="*", color="lime", markersize=11, markeredgecolor="k", zorder=5)
            ax.plot(p["pred_lon"][i], p["pred_lat"][i], marker="x", color="red", markersize=9, mew=2, zorder=6)
            ax.set_title(f"{entry.label}: error {p['dist_km'][i]:,.0f} km, top-1 p={p['topk_prob'][i][0]:.2f}",
                         fontsize=8)
            if col == 0:
                ax.set_ylabel(f"{label}\n{image_id[-24:]}", fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="log10 pixel probability (relative to max)")
    return fig


def partition_figure(partition, n_lon: int = 720) -> Figure:
    """The partition's cells (boundaries) coloured by log10 of their training-image count."""
    lat, lon, _ = lat_lon_grid(n_lon)
    cell = partition.assign(lat.ravel(), lon.ravel()).reshape(lat.shape)
    counts = np.asarray(partition.counts, dtype=np.float64)
    edge = np.zeros(cell.shape, bool)  # a pixel whose cell differs from its east or north neighbour
    edge[:, :-1] |= cell[:, :-1] != cell[:, 1:]
    edge[:-1, :] |= cell[:-1, :] != cell[1:, :]
    fig = Figure(figsize=(10, 5.0), layout="constrained")
    ax = fig.subplots()
    draw_world(ax, background=False)
    image = ax.imshow(np.log10(counts[cell] + 1), extent=(-180, 180, -90, 90), origin="lower",
                      cmap="viridis", alpha=0.8, zorder=1)
    ax.imshow(np.ma.masked_where(~edge, edge.astype(float)), extent=(-180, 180, -90, 90), origin="lower",
              cmap=ListedColormap(["black"]), alpha=0.7, zorder=2, interpolation="nearest")
    ax.set_title(f"adaptive S2 partition: {partition.n_cells} cells")
    fig.colorbar(image, ax=ax, shrink=0.7, label="log10(training images in the cell + 1)")
    return fig


def centres_figure(entry: LoadedRun) -> Figure:
    """MvMF means before training (cell centres or means, by mu_init) and after, coloured by log κ."""
    mu_init = entry.head.options.get("mu_init", "centre")
    before = np.asarray(entry.head.initial_means_xyz(entry.partition))
    mixture = entry.head.vmf_mixture(torch.zeros(entry.head.max_k))  # the components do not depend on the input
    after, log_kappa = mixture.mu_xyz.numpy(), mixture.log_kappa.numpy()
    lat0, lon0 = xyz_to_latlon(before)
    lat1, lon1 = xyz_to_latlon(after)
    fig = Figure(figsize=(10, 5.0), layout="constrained")
    ax = fig.subplots()
    draw_world(ax, background=False)
    near = np.abs(lon1 - lon0) < 180  # no segment across the antimeridian
    ax.plot(np.stack([lon0[near], lon1[near]]), np.stack([lat0[near], lat1[near]]), color="0.5", lw=0.4, zorder=3)
    ax.scatter(lon0, lat0, s=22, facecolors="none", edgecolors="0.2", linewidths=0.6, zorder=4,
               label=f"before training ({mu_init}s of the cells)")
    points = ax.scatter(lon1, lat1, s=6, c=log_kappa, cmap="plasma", zorder=5, label="after training")
    ax.legend(loc="lower left", fontsize=7)
    ax.set_title(f"MvMF component means, {entry.label}")
    fig.colorbar(points, ax=ax, shrink=0.7, label="log κ after training")
    return fig


def make_maps(runs: list[Run], *, cache_path: str | Path | None = None, n_images: int = 4,
              background: bool = True) -> tuple[list[tuple[str, Figure, str]], list[str]]:
    """All map figures as (file name, figure, caption), and notes on what was skipped and why.

    One run per head is drawn (the best on validation among those with a checkpoint).
    ``cache_path`` overrides the caches named in the runs' configs.
    """
    notes: list[str] = []
    loaded: list[LoadedRun] = []
    for head in sorted({r.head for r in runs}):
        candidates = [r for r in runs if r.head == head and r.checkpoint_path.exists() and r.predictions_path.exists()]
        if not candidates:
            notes.append(f"{head}: no run with checkpoint.pt and predictions.parquet")
            continue
        try:
            loaded.append(load_run(pick_one(candidates)))
        except (ValueError, ImportError) as err:
            notes.append(str(err))
    if not loaded:
        return [], notes
    figures: list[tuple[str, Figure, str]] = []
    mvmf = next((e for e in loaded if e.head.shared_components), None)
    reference = mvmf or loaded[0]
    with_cells = mvmf or next((e for e in loaded if e.partition is not None), None)  # heads without cells have none
    if with_cells is not None:
        figures.append(("partition.png", partition_figure(with_cells.partition),
                        f"Cells of the partition of {with_cells.run.name}, coloured by training images per cell."))
    if mvmf is not None:
        figures.append(("mvmf_means.png", centres_figure(mvmf),
                        f"MvMF component means of {mvmf.run.name} before (open circles) and after training "
                        "(dots, coloured by the trained log κ); grey segments join each pair (paper fig. 5)."))
    picked = select_images(reference.predictions, n_images)
    images = [(reference.predictions["id"][i], label) for i, label in picked]
    features, drawable = {}, []
    for entry in loaded:
        source = cache_path or entry.run.cache_path
        if not source or not Path(source).exists():
            notes.append(f"{entry.run.name}: density maps need the feature cache ({source or 'none recorded'} "
                         "not found; pass --cache)")
            continue
        try:
            features[entry.run.name] = load_features(source, [i for i, _ in images])
        except (ValueError, OSError) as err:
            notes.append(f"{entry.run.name}: {err}")
            continue
        if all(i in set(entry.predictions["id"]) for i, _ in images):
            drawable.append(entry)
        else:
            notes.append(f"{entry.run.name}: its predictions.parquet lacks the selected images")
    if drawable:
        figures.append(("density_maps.png", density_figure(drawable, images, features, background),
                        f"Predicted probability per 1° pixel (log10, {DECADES} decades below each map's maximum; "
                        "each pixel shows the maximum of its 5×5 neighbourhood) "
                        f"for the {len(images)} test images that {reference.run.name} is most and least certain "
                        "of (top-1 probability); ★ true location, × prediction (paper figs. 1-2)."))
    return figures, notes
