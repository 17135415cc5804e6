"""What a test set can show, recorded when a run is scored (``metrics.json``), so reports need no cache.

Two figures a test set's accuracies must be read against:

- ``train_distance_km``: the great-circle distance from each evaluated image to the
  nearest image of the training cache's train split (the whole split, also for a run
  trained on a ``--train-fraction`` subset: the data the test set is set against):
  its minimum, median and the number of train images. Accuracy at a scale below the
  minimum cannot show what a head learned there: no training image lies that close to
  any test image (e.g. the demo holds out every test image >= 100 km from train).
- ``densest_cell``: the trivial baseline of the run's own partition (heads over cells
  only): every image predicted at the normalised mean of the training points of the
  cell holding the most of them (as ``geo baseline``), its accuracy at each scale.

Uniform guessing needs no data: ``geo.metrics.uniform_accuracy`` (closed form).
"""

from __future__ import annotations

import numpy as np

from geo.errors import CacheError
from geo.geometry import great_circle_km, nearest_distance_km, xyz_to_latlon
from geo.metrics import DISTANCE_SCALES_KM, accuracy_at_km, accuracy_key

TRAIN_DISTANCE_KEY = "train_distance_km"
DENSEST_CELL_KEY = "densest_cell"


def train_distance_summary(lat_deg, lon_deg, train_lat_deg, train_lon_deg) -> dict:
    """``{"min", "median", "n_train"}``: km from each point [n] to its nearest train point [m]."""
    dist_km = nearest_distance_km(lat_deg, lon_deg, train_lat_deg, train_lon_deg)
    return {"min": float(dist_km.min()), "median": float(np.median(dist_km)), "n_train": int(np.size(train_lat_deg))}


def densest_cell_summary(lat_deg, lon_deg, partition) -> dict:
    """``{"n_cells", "acc@Xkm"..., "median_km"}`` of predicting the densest cell's training mean for
    every point (lat_deg, lon_deg [n]); ``partition`` a ``geo.sphere.partition.Partition``."""
    lat, lon = xyz_to_latlon(partition.means_xyz[int(np.argmax(partition.counts))])
    dist_km = great_circle_km(np.asarray(lat_deg, np.float64), np.asarray(lon_deg, np.float64), lat, lon)
    return {"n_cells": int(len(partition.counts)),
            **{accuracy_key(s): accuracy_at_km(dist_km, s) for s in DISTANCE_SCALES_KM},
            "median_km": float(np.median(dist_km))}


def reference_metrics(lat_deg, lon_deg, *, train_lat_lon=None, partition=None) -> dict:
    """The keys this module adds to a ``metrics.json`` for the evaluated points (lat_deg, lon_deg [n]).

    train_lat_lon: (lat_deg [m], lon_deg [m]) of the training cache's train split, or None
    (not at hand: the key is left out); partition: the run's partition or None (no cells).
    """
    out = {}
    if train_lat_lon is not None and np.size(train_lat_lon[0]) and np.size(lat_deg):
        out[TRAIN_DISTANCE_KEY] = train_distance_summary(lat_deg, lon_deg, *train_lat_lon)
    if partition is not None and np.size(lat_deg):
        out[DENSEST_CELL_KEY] = densest_cell_summary(lat_deg, lon_deg, partition)
    return out


def train_locations(cache) -> tuple[np.ndarray, np.ndarray] | None:
    """(lat_deg, lon_deg) of an open cache's train split, None when it has none."""
    try:
        rows = cache.split_rows("train")
    except CacheError:
        return None
    return cache.lat_deg[rows], cache.lon_deg[rows]
