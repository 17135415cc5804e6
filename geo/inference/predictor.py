"""Geolocate new images with a trained run: ``geo.predict(run, images)`` and ``geo predict``.

A run directory records the provenance of the cache it was trained on
(``config.json`` -> ``cache_provenance``): the backbone name, the sha256 of the
fine-tuned backbone checkpoint (``weights``), its path (``checkpoint_path``), the
image size and the evaluation transform. ``Predictor`` finds that checkpoint (or
the one passed as ``backbone_checkpoint``), refuses it when its sha256 differs from
the recorded one, applies the same evaluation transform, and runs the head of the
run's selected (best-on-val) weights.

Each image gets the top-k locations (``head.predict``: component means / cells for
"argmax", density maxima for "mode"), their mixing weight or cell probability, the
log-density there, the country (``geo.pipeline.countries``) and the nearest named
place (``geo.places``), and the radii around the best guess holding 50 % and 95 % of
the predicted probability (``geo.inference.credible``). Only pixels are used: EXIF metadata is
never read for the prediction (``compare_exif`` only measures the distance to it).
Unreadable images come back with ``error`` set; the others are still predicted.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from geo.errors import GeoError
from geo.files import sha256_file
from geo.geometry import EARTH_RADIUS_KM, great_circle_km, latlon_to_xyz
from geo.inference.credible import calibration_statement, head_radii_km
from geo.pipeline.countries import country_codes, country_name
from geo.training import runs
from geo.training.evaluate import feature_dtype

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


class BackboneError(GeoError):
    """The run's backbone checkpoint is missing, unrecorded, or not the one the run was trained on."""


@dataclass
class Location:
    """One of the top-k predicted locations of an image (degrees; ``prob`` is None for ``mode``)."""

    rank: int
    lat_deg: float
    lon_deg: float
    prob: float | None  # mixing weight (MvMF) / cell probability (softmax) of this location
    log_density: float  # log predicted density at the point, nats per steradian
    country: str  # ISO alpha-2 of the point, "XX" = open sea / Antarctica
    place: str  # nearest GeoNames place ("name, region, CC")
    place_dist_km: float

    @property
    def density_per_km2(self) -> float:
        return math.exp(self.log_density) / EARTH_RADIUS_KM**2


@dataclass
class PredictionResult:
    """Prediction for one image. ``error`` is the reason when the image could not be used."""

    path: str
    predict: str = ""
    locations: list[Location] = field(default_factory=list)
    radius_50_km: float | None = None  # around locations[0], holding 50 % of the probability
    radius_95_km: float | None = None
    error: str | None = None
    exif_lat_deg: float | None = None  # only with compare_exif, when the file has a usable GPS position
    exif_lon_deg: float | None = None
    exif_dist_km: float | None = None  # from locations[0]
    exif_note: str | None = None  # why there is no EXIF position

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        """A JSON-able dict (one line of ``geo predict --json``)."""
        out = asdict(self)
        out["ok"] = self.ok
        return out


def find_images(inputs: Sequence[str | os.PathLike], *, recursive: bool = False) -> list[Path]:
    """Image files named by ``inputs``: files as given, folders scanned for ``IMAGE_SUFFIXES``.

    Raises GeoError for a path that does not exist, or a folder holding no images.
    """
    if not inputs:
        raise GeoError("no images given: pass image files or folders")
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in (p.rglob("*") if recursive else p.iterdir())
                           if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise GeoError(f"folder {p} holds no images (looked for {' '.join(IMAGE_SUFFIXES)}"
                               f"{', in sub-folders too' if recursive else '; --recursive scans sub-folders'})")
            paths.extend(found)
        elif p.exists():
            paths.append(p)  # named explicitly: tried whatever its suffix; failures are reported per image
        else:
            raise GeoError(f"{p}: no such file or folder")
    return paths


def resolve_backbone_checkpoint(run_dir: Path, provenance: dict, override: str | os.PathLike | None) -> Path:
    """The backbone checkpoint of the run (``override`` or the recorded path), checked against the recorded sha256."""
    recorded_sha = provenance.get("weights")
    recorded_path = provenance.get("checkpoint_path")
    how = (f"recorded in {run_dir / 'config.json'} (cache_provenance: backbone {provenance.get('backbone')!r}, "
           f"weights sha256 {recorded_sha}, image_size {provenance.get('image_size')})")
    if not recorded_sha or "backbone" not in provenance or "image_size" not in provenance:
        raise BackboneError(f"run {run_dir} was trained on a cache whose provenance names no backbone checkpoint "
                            f"({provenance!r}); it cannot be applied to images")
    if override is None:
        if not recorded_path:
            raise BackboneError(f"run {run_dir} needs the backbone checkpoint with sha256 {recorded_sha}, "
                                f"{how}, but no path was recorded; pass --backbone-checkpoint PATH")
        path = Path(recorded_path)
        if not path.is_file():
            raise BackboneError(f"run {run_dir} needs the backbone checkpoint {path}, {how}, and it is missing; "
                                "copy it there or pass --backbone-checkpoint PATH to a copy")
    else:
        path = Path(override)
        if not path.is_file():
            raise BackboneError(f"--backbone-checkpoint {path}: no such file")
    actual = sha256_file(path)
    if actual != recorded_sha:
        raise BackboneError(f"backbone checkpoint {path} has sha256 {actual}, but run {run_dir} was trained on "
                            f"features of the checkpoint with sha256 {recorded_sha} "
                            f"({recorded_path or 'path not recorded'}); "
                            "refusing: its features would not be what the head learned from")
    return path


class Predictor:
    """A run's head and its backbone, loaded once; ``predict(paths)`` geolocates images.

    Args:
        run: a run directory written by ``geo fit-head``.
        backbone_checkpoint: use this file instead of the recorded checkpoint path (its
            sha256 must equal the recorded one).
        mode: one of the head's ``predict_modes`` (mvmf: argmax, mode; softmax: centre, mean,
            argmax, mode); None = the run's own.
        device: "auto", "cpu", "cuda" ...; precision: "auto", "bf16" or "fp32" for the backbone.
    Attributes:
        timings: seconds spent so far in "decode" (read + transform), "backbone", "head"
            (logits, top-k, radii), "places" (country + nearest place) and "total".
        calibration: one sentence saying whether the run's credible regions held the truth as often
            as they claim on its own test split (``geo.inference.credible.calibration_statement``).
    """

    def __init__(self, run: str | os.PathLike, *, backbone_checkpoint: str | os.PathLike | None = None,
                 mode: str | None = None, device: str = "auto", precision: str = "auto"):
        from geo.pipeline.backbone import backbone_eval_transform, backbone_resize_px, create_backbone, placement
        from geo.pipeline.images import describe_transform

        self.run_dir = Path(run)
        self.config = runs.read_config(self.run_dir)
        provenance = self.config.get("cache_provenance") or {}
        self.checkpoint_path = resolve_backbone_checkpoint(self.run_dir, provenance, backbone_checkpoint)
        self.place = placement(device, precision)
        self.backbone = self.place.to(create_backbone(provenance["backbone"], str(self.checkpoint_path))).eval()
        if self.backbone.feature_dim != int(self.config["cache_feature_dim"]):
            raise BackboneError(f"{self.checkpoint_path}: {provenance['backbone']} gives {self.backbone.feature_dim}-d "
                                f"features, run {self.run_dir} expects {self.config['cache_feature_dim']}")
        image_size = int(provenance["image_size"])
        self.transform = backbone_eval_transform(self.backbone, image_size)
        # Decode as the cache was decoded (reduced-scale JPEG decoding: geo.pipeline.images.load_rgb).
        self.draft_short_side = (backbone_resize_px(self.backbone, image_size)
                                 if provenance.get("decode") == "draft" else None)
        if provenance.get("transform") and describe_transform(self.transform) != provenance["transform"]:
            warnings.warn(f"the evaluation transform differs from the one recorded in {self.run_dir}: "
                          f"{describe_transform(self.transform)!r} vs {provenance['transform']!r}", stacklevel=2)
        self.head = runs.load_head(self.run_dir).head
        # The head says which modes it offers; the run's own mode is the default.
        self.mode = self.head.check_predict(mode or self.config.get("predict"))
        self.feature_dtype = feature_dtype(self.config["precision"])
        self.timings = dict(decode=0.0, backbone=0.0, head=0.0, places=0.0, total=0.0)
        # Whether the radii this run prints held the truth as often as they claim, on its own test split.
        try:
            own_metrics = runs.read_json(self.run_dir / runs.METRICS_FILE)
        except (OSError, ValueError, GeoError):
            own_metrics = None
        self.calibration = calibration_statement(own_metrics)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Head logits ``[B, c]`` (float32, CPU) of transformed images ``[B, 3, H, W]``."""
        from geo.devices import autocast

        t0 = time.perf_counter()
        with torch.inference_mode(), autocast(self.place.device, self.place.precision):
            feats = self.backbone.forward_features(self.place.inputs(images))
        feats = feats.float().cpu()
        t1 = time.perf_counter()
        with torch.inference_mode():
            logits = self.head(feats.to(self.feature_dtype)).float()
        self.timings["backbone"] += t1 - t0
        self.timings["head"] += time.perf_counter() - t1
        return logits

    def describe(self, path: str, logits: torch.Tensor, top_k: int) -> PredictionResult:
        """The result for one image's logits ``[c]`` (countries and places filled in by ``predict``)."""
        t0 = time.perf_counter()
        k = max(1, min(int(top_k), self.head.max_k))
        row = logits[None]
        with torch.no_grad():
            lat, lon = self.head.predict(row, k=k, mode=self.mode)
            lat, lon = lat[0].double().numpy(), lon[0].double().numpy()
            # Density maxima have no probability of their own; ranked components / cells do.
            probs = self.head.topk(row, k)[0][0].double().numpy() if self.mode != "mode" else [None] * k
            xyz = torch.from_numpy(latlon_to_xyz(lat, lon))
            log_dens = self.head.log_density(row, xyz)[0].double().numpy()
        radii = head_radii_km(self.head, logits, xyz[0].numpy())
        locations = [Location(i + 1, float(lat[i]), float(lon[i]), None if probs[i] is None else float(probs[i]),
                              float(log_dens[i]), "", "", float("nan")) for i in range(k)]
        self.timings["head"] += time.perf_counter() - t0
        r50, r95 = (None, None) if radii is None else (float(radii[0]), float(radii[1]))
        result = PredictionResult(str(path), self.mode, locations, r50, r95)
        result.logits = logits  # not a field: kept for maps, left out of to_dict()
        return result

    def predict(self, paths: Iterable[str | os.PathLike], *, top_k: int = 5, compare_exif: bool = False,
                batch_size: int = 32, workers: int = 0, progress: bool = False) -> list[PredictionResult]:
        """One ``PredictionResult`` per path, in order (unreadable images: ``error`` set)."""
        from tqdm.auto import tqdm

        from geo.pipeline.finetune import image_loader

        t_start = time.perf_counter()
        paths = [str(p) for p in paths]
        results: list[PredictionResult | None] = [None] * len(paths)
        loader = image_loader(paths, self.transform, batch_size=batch_size, workers=workers,
                              draft_short_side=self.draft_short_side)
        bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress, leave=False)
        t_decode = time.perf_counter()
        for index, images, failures in loader:
            self.timings["decode"] += time.perf_counter() - t_decode
            for i, reason in failures:
                results[i] = PredictionResult(paths[i], self.mode, error=reason)
            if len(index):
                logits = self.logits(images)
                for j, i in enumerate(index.tolist()):
                    results[i] = self.describe(paths[i], logits[j], top_k)
            bar.update(len(index) + len(failures))
            t_decode = time.perf_counter()
        bar.close()
        done = [r for r in results if r is not None and r.ok]
        self._add_places(done)
        if compare_exif:
            _add_exif([r for r in results if r is not None and r.ok])
        self.timings["total"] += time.perf_counter() - t_start
        return [r for r in results if r is not None]

    def _add_places(self, results: list[PredictionResult]) -> None:
        from geo.places import nearest_places

        t0 = time.perf_counter()
        locs = [loc for r in results for loc in r.locations]
        if locs:
            lat = np.array([loc.lat_deg for loc in locs])
            lon = np.array([loc.lon_deg for loc in locs])
            for loc, code, place in zip(locs, country_codes(lat, lon), nearest_places(lat, lon)):
                loc.country, loc.place, loc.place_dist_km = str(code), place.label, place.dist_km
        self.timings["places"] += time.perf_counter() - t0


def _add_exif(results: list[PredictionResult]) -> None:
    """Fill in the EXIF GPS position and its distance to the best guess (never used to predict)."""
    from geo.pipeline.exif import NoGPSError, read_gps

    for r in results:
        try:
            lat, lon = read_gps(r.path)
        except NoGPSError as err:
            r.exif_note = str(err)
            continue
        r.exif_lat_deg, r.exif_lon_deg = lat, lon
        best = r.locations[0]
        r.exif_dist_km = float(great_circle_km(lat, lon, best.lat_deg, best.lon_deg))


def predict(run: str | os.PathLike, images: str | os.PathLike | Sequence[str | os.PathLike], *, top_k: int = 5,
            mode: str | None = None, backbone_checkpoint: str | os.PathLike | None = None,
            compare_exif: bool = False, recursive: bool = False, device: str = "auto", precision: str = "auto",
            batch_size: int = 32, workers: int = 0, progress: bool = False) -> list[PredictionResult]:
    """Geolocate images (files and/or folders) with run ``run``; one result per image found.

    Example::

        import geo
        for r in geo.predict("runs/mvmf-8k", ["photos/"], top_k=3):
            print(r.path, r.locations[0].lat_deg, r.locations[0].lon_deg, r.radius_50_km)
    """
    paths = find_images([images] if isinstance(images, (str, os.PathLike)) else list(images), recursive=recursive)
    predictor = Predictor(run, backbone_checkpoint=backbone_checkpoint, mode=mode, device=device, precision=precision)
    return predictor.predict(paths, top_k=top_k, compare_exif=compare_exif, batch_size=batch_size, workers=workers,
                             progress=progress)


def format_result(result: PredictionResult) -> str:
    """The plain-text block ``geo predict`` prints for one image."""
    if not result.ok:
        return f"{result.path}\n  unreadable: {result.error}"
    lines = [result.path]
    for loc in result.locations:
        weight = f"p={loc.prob:.3f}" if loc.prob is not None else f"density {loc.density_per_km2:.3g}/km²"
        lines.append(f"  {loc.rank}. {loc.lat_deg:9.4f} {loc.lon_deg:10.4f}  {weight:<12} {loc.country} "
                     f"({country_name(loc.country)})  near {loc.place} ({loc.place_dist_km:,.0f} km)")
    if result.radius_50_km is not None:
        spread = f"  50 % of the probability within {result.radius_50_km:,.1f} km of the best guess, " \
                 f"95 % within {result.radius_95_km:,.1f} km"
        if result.radius_50_km > 2500:
            spread += " (weakly localizable)"
        lines.append(spread)
    if result.exif_dist_km is not None:
        lines.append(f"  EXIF GPS {result.exif_lat_deg:.4f} {result.exif_lon_deg:.4f}: "
                     f"{result.exif_dist_km:,.1f} km from the best guess")
    elif result.exif_note:
        lines.append(f"  EXIF GPS: none ({result.exif_note})")
    return "\n".join(lines)
