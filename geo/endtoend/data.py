"""The data side of end-to-end fine-tuning: seeded training batches, val features in memory, manifest checks.

``SeededBatches`` makes training batch k of an epoch a function of (seed, epoch, k) alone:
its rows come from a permutation of the train rows drawn from (seed, epoch), and its
augmentation from a torch seed of (seed, epoch, k) set just before its images are
transformed, in whatever process decodes them. So a run resumed in the middle of an
epoch, a run with other DataLoader workers and a run under torchrun (each rank decoding
its contiguous shard of every global batch) all see the same pixels.

``FeatureArrays`` holds features of some manifest rows in memory behind the part of the
``FeatureCache`` API that ``geo.training.evaluate`` uses, so the val split is scored
through the backbone being trained with the very loop fit-head uses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from geo.errors import ConfigError
from geo.pipeline.distributed import shard_range
from geo.pipeline.images import ImageRows, collate_rows
from geo.pipeline.manifest import Manifest

SPLIT_NAMES = ("train", "val", "test")


def epoch_order(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of epoch ``epoch``: a permutation of ``range(n_rows)`` drawn from (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def batch_seed(seed: int, epoch: int, batch: int) -> int:
    """The torch seed of training batch ``batch`` of ``epoch`` (augmentation and dropout)."""
    return int(np.random.default_rng([seed, epoch, batch, 7]).integers(0, 2**62))


class SeededBatches(Dataset):
    """Item k = this rank's shard of global batch ``first_batch + k``: ``collate_rows`` output.

    paths: image path per train row; order: the epoch's permutation of train rows; batch_size:
    the global batch; rank/world_size: this process's contiguous shard of each global batch.
    ``transform`` (per image) runs after a torch seed of (batch seed, the image's place in the global
    batch); ``batch_transform`` (a ``BatchColorJitter``: ``sample`` + ``apply``) draws the factors of the
    whole global batch from the batch seed and applies this shard's. Indices in the output are
    train-row positions (into ``paths``).
    """

    def __init__(self, paths, order: np.ndarray, batch_size: int, *, seed: int, epoch: int, first_batch: int,
                 transform, batch_transform=None, rank: int = 0, world_size: int = 1):
        self.rows = ImageRows(paths, transform)
        self.order, self.batch_size = order, batch_size
        self.seed, self.epoch, self.first_batch = seed, epoch, first_batch
        self.batch_transform = batch_transform
        self.rank, self.world_size = rank, world_size
        self.n_batches = -(-len(order) // batch_size)

    def __len__(self) -> int:
        return max(0, self.n_batches - self.first_batch)

    def global_rows(self, k: int) -> np.ndarray:
        """Train-row positions of global batch ``first_batch + k`` (all ranks)."""
        b = self.first_batch + k
        return self.order[b * self.batch_size:(b + 1) * self.batch_size]

    def __getitem__(self, k: int):
        rows = self.global_rows(k)
        lo, hi = shard_range(len(rows), self.rank, self.world_size)
        seed = batch_seed(self.seed, self.epoch, self.first_batch + k)
        items = []
        for position in range(lo, hi):  # each image's crop and flip: seeded by its place in the global batch
            torch.manual_seed(seed + 1 + position)
            items.append(self.rows[int(rows[position])])
        index, images, failures = collate_rows(items)
        if self.batch_transform is not None:
            # The batch's colour factors are drawn for the whole global batch, then this shard's taken.
            torch.manual_seed(seed)
            factors = self.batch_transform.sample(len(rows))[lo:hi]
            good = [p for p, (_, x, reason) in enumerate(items) if x is not None and not reason]
            images = self.batch_transform.apply(images, factors[good]) if good else images
        return index, images, failures, len(rows)


class FeatureArrays:
    """Features of some manifest rows in memory, read as ``geo.training.evaluate`` reads a ``FeatureCache``.

    features: float16 [n, d] (rounded as a cache stores them); the other arrays [n] per row.
    """

    def __init__(self, features: np.ndarray, *, ids, lat_deg, lon_deg, split, country, countries: list[str]):
        self.features = np.asarray(features, np.float16)
        self.ids, self.lat_deg, self.lon_deg = np.asarray(ids), np.asarray(lat_deg), np.asarray(lon_deg)
        self.split, self.country, self.countries = np.asarray(split), np.asarray(country), list(countries)
        self.skipped: list = []
        self.n_rows, self.feature_dim = self.features.shape

    def split_rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == SPLIT_NAMES.index(split)).astype(np.int64)

    def iter_batches(self, split: str, batch_size: int, *, shuffle: bool = False, **_):
        rows = self.split_rows(split)
        for i in range(0, len(rows), batch_size):
            yield rows[i:i + batch_size], self.features[rows[i:i + batch_size]]


def count_differing_rows(manifest: Manifest, cache) -> int:
    """Rows where ``manifest`` and the rows ``cache`` was built from differ: ids in one only, and
    shared ids whose location or split differ. The cache's unreadable (skipped) rows count as its rows."""
    cached = {str(i): (float(a), float(o), int(s)) for i, a, o, s in
              zip(cache.ids, cache.lat_deg, cache.lon_deg, cache.split)}
    skipped = {str(i) for i, _ in cache.skipped}
    ours = {str(i): (float(a), float(o), int(s)) for i, a, o, s in
            zip(manifest.ids, manifest.lat_deg, manifest.lon_deg, manifest.split)}
    differing = len((set(cached) | skipped) ^ set(ours))
    for key, value in ours.items():
        if key in cached and (abs(cached[key][0] - value[0]) > 1e-9 or abs(cached[key][1] - value[1]) > 1e-9
                              or cached[key][2] != value[2]):
            differing += 1
    return differing


def check_manifest_splits(manifest: Manifest) -> None:
    counts = manifest.split_counts()
    missing = [name for name in ("train", "val") if counts.get(name, 0) == 0]
    if missing:
        raise ConfigError(f"{manifest.path}: no rows in the {' and '.join(missing)} split "
                          f"({', '.join(f'{k} {v}' for k, v in counts.items())}); end-to-end fine-tuning trains "
                          "on train and selects on val")


def sub_manifest(manifest: Manifest, rows: np.ndarray) -> Manifest:
    """The manifest's ``rows`` (in order) as a manifest of their own (same file and hash)."""
    pick = lambda a: None if a is None else a[rows]  # noqa: E731
    return Manifest(ids=manifest.ids[rows], paths=manifest.paths[rows], lat_deg=manifest.lat_deg[rows],
                    lon_deg=manifest.lon_deg[rows], split=manifest.split[rows], path=Path(manifest.path),
                    sha256=manifest.sha256, country=pick(manifest.country))
