"""Tiny real-JPEG datasets for the stage-one tests (fine-tune, extract, DDP).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Real places in four countries (lat_deg, lon_deg) and their ISO codes.
PLACES = [(48.8566, 2.3522, "FR"), (52.52, 13.405, "DE"), (40.4168, -3.7038, "ES"),
          (41.9028, 12.4964, "IT")]


def write_dataset(folder, n=12, *, size_px=40, corrupt=(), seed=0, splits=None):
    """Write ``n`` JPEGs (coloured noise, tinted by country) and a CSV manifest.

    corrupt: row indices made unreadable (zero-byte, truncated, not an image, in turn).
    splits: split name per row (default: train, except rows 9, 10 val and 11 test style).
    Returns the manifest path.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["id,path,lat,lon,split"]
    kinds = ["zero", "truncated", "text"]
    for i in range(n):
        lat, lon, _ = PLACES[i % len(PLACES)]
        tint = np.array([60 * (i % 4), 255 - 60 * (i % 4), 128])
        pixels = np.clip(rng.normal(0, 40, (size_px, size_px, 3)) + tint, 0, 255).astype(np.uint8)
        path = folder / f"img{i:03d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        if i in corrupt:
            kind = kinds[list(corrupt).index(i) % 3]
            data = path.read_bytes()
            path.write_bytes(b"" if kind == "zero" else data[: len(data) // 3] if kind == "truncated"
                             else b"this is not a jpeg\n")
        split = splits[i] if splits else ("val" if i % 6 == 4 else "test" if i % 6 == 5 else "train")
        lines.append(f"id{i:03d},{path.name},{lat + 0.01 * i},{lon},{split}")
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest
