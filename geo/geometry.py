"""Geometry on the unit sphere: coordinates, great-circle distances, the vMF density.

Conventions used everywhere in geo:

- coordinates are degrees, always in the order (lat, lon); latitude in
  [-90, 90], longitude wrapped to [-180, 180);
- unit vectors are (x, y, z) = (cos lat cos lon, cos lat sin lon, sin lat);
- distances are great-circle kilometres on a sphere of radius
  ``EARTH_RADIUS_KM`` (the IUGG mean radius, 6371.0088 km);
- the von Mises-Fisher density is per steradian on the unit sphere S^2.

Functions taking arrays accept numpy arrays or torch tensors and return the
same kind, so one implementation serves the data pipeline (numpy) and the
heads (torch, differentiable).
"""

from __future__ import annotations

import math
from typing import Union

import numpy as np
import torch

Array = Union[np.ndarray, torch.Tensor]

EARTH_RADIUS_KM = 6371.0088
LOG_2PI = math.log(2.0 * math.pi)


def _lib(x: Array):
    """The array namespace of ``x``: ``torch`` for tensors, else ``numpy``."""
    return torch if isinstance(x, torch.Tensor) else np


def latlon_to_xyz(lat_deg: Array, lon_deg: Array) -> Array:
    """Unit vectors of points given in degrees.

    Args:
        lat_deg, lon_deg: broadcastable arrays of latitude and longitude, degrees.
    Returns:
        ``[..., 3]`` unit vectors (cos lat cos lon, cos lat sin lon, sin lat),
        in the dtype of the inputs (float64 for numpy integer input).
    """
    xp = _lib(lat_deg)
    if xp is np:
        lat_deg, lon_deg = np.asarray(lat_deg), np.asarray(lon_deg)
        dtype = np.result_type(lat_deg, lon_deg, np.float32)  # keeps float32, promotes ints to float64
        dtype = np.float64 if not np.issubdtype(np.result_type(lat_deg, lon_deg), np.floating) else dtype
        lat, lon = np.deg2rad(lat_deg.astype(dtype)), np.deg2rad(lon_deg.astype(dtype))
        lat, lon = np.broadcast_arrays(lat, lon)
        cos_lat = np.cos(lat)
        return np.stack([cos_lat * np.cos(lon), cos_lat * np.sin(lon), np.sin(lat)], axis=-1)
    lat = torch.deg2rad(lat_deg)
    lon = torch.deg2rad(torch.as_tensor(lon_deg, dtype=lat.dtype, device=lat.device))
    lat, lon = torch.broadcast_tensors(lat, lon)
    cos_lat = torch.cos(lat)
    return torch.stack([cos_lat * torch.cos(lon), cos_lat * torch.sin(lon), torch.sin(lat)], dim=-1)


def xyz_to_latlon(xyz: Array) -> tuple[Array, Array]:
    """Degrees (lat, lon) of vectors ``[..., 3]``; the vectors need not be unit length.

    Uses atan2 for both angles, so latitude is accurate near the poles too.
    Longitude is in [-180, 180] (atan2's range; -180 and 180 are the same meridian).
    The zero vector maps to (0, 0).
    """
    xp = _lib(xyz)
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    horizontal = xp.sqrt(x * x + y * y)
    if xp is np:
        return np.rad2deg(np.arctan2(z, horizontal)), np.rad2deg(np.arctan2(y, x))
    return torch.rad2deg(torch.atan2(z, horizontal)), torch.rad2deg(torch.atan2(y, x))


def wrap_lon_deg(lon_deg: Array) -> Array:
    """Longitude wrapped into [-180, 180)."""
    return (lon_deg + 180.0) % 360.0 - 180.0


def normalize(xyz: Array, eps: float = 1e-30) -> Array:
    """``xyz`` scaled to unit length along the last axis (``[..., 3]``)."""
    xp = _lib(xyz)
    if xp is np:
        norm = np.linalg.norm(xyz, axis=-1, keepdims=True)
        return xyz / np.maximum(norm, eps)
    return xyz / torch.linalg.vector_norm(xyz, dim=-1, keepdim=True).clamp_min(eps)


def central_angle_rad(lat1_deg: Array, lon1_deg: Array, lat2_deg: Array, lon2_deg: Array) -> Array:
    """Central angle between two points, radians in [0, pi].

    The Vincenty form of the spherical law (atan2 of the cross and dot
    products), which keeps full relative precision for coincident, nearby and
    antipodal points alike; haversine loses it near antipodes and the plain
    arccos of the dot product loses it for small distances.
    """
    xp = _lib(lat1_deg)
    rad = np.deg2rad if xp is np else torch.deg2rad
    phi1, phi2 = rad(lat1_deg), rad(lat2_deg)
    dlam = rad(lon2_deg - lon1_deg)
    sin1, cos1 = xp.sin(phi1), xp.cos(phi1)
    sin2, cos2 = xp.sin(phi2), xp.cos(phi2)
    sin_dlam, cos_dlam = xp.sin(dlam), xp.cos(dlam)
    a = cos2 * sin_dlam
    b = cos1 * sin2 - sin1 * cos2 * cos_dlam
    cross = xp.sqrt(a * a + b * b)
    dot = sin1 * sin2 + cos1 * cos2 * cos_dlam
    return xp.arctan2(cross, dot) if xp is np else torch.atan2(cross, dot)


def great_circle_km(lat1_deg: Array, lon1_deg: Array, lat2_deg: Array, lon2_deg: Array) -> Array:
    """Great-circle distance in km between broadcastable arrays of points in degrees."""
    return EARTH_RADIUS_KM * central_angle_rad(lat1_deg, lon1_deg, lat2_deg, lon2_deg)


def angle_between_xyz(a: Array, b: Array) -> Array:
    """Angle in radians between vectors ``a`` and ``b`` (``[..., 3]``, any length), via atan2(|a x b|, a . b)."""
    xp = _lib(a)
    if xp is np:
        cross = np.linalg.norm(np.cross(a, b), axis=-1)
        return np.arctan2(cross, np.sum(a * b, axis=-1))
    a, b = torch.broadcast_tensors(a, b)
    cross = torch.linalg.vector_norm(torch.linalg.cross(a, b, dim=-1), dim=-1)
    return torch.atan2(cross, (a * b).sum(-1))



def nearest_distance_km(lat_deg, lon_deg, ref_lat_deg, ref_lon_deg, *, chunk_rows: int = 65_536) -> np.ndarray:
    """Great-circle km [n] from each point (lat_deg, lon_deg [n]) to its nearest reference point ([m], m >= 1).

    Exact: a KD-tree over the references' unit vectors finds the nearest by chord length,
    which is monotonic in the great-circle distance (no seam at +-180 deg, no pole
    distortion), and the chord c is turned into the arc 2 R asin(c / 2). Queries go in
    chunks of ``chunk_rows`` so memory stays bounded for millions of points.
    """
    from scipy.spatial import cKDTree  # lazy: geometry is imported everywhere, scipy only needed here

    lat = np.asarray(lat_deg, np.float64).ravel()
    lon = np.asarray(lon_deg, np.float64).ravel()
    ref_lat = np.asarray(ref_lat_deg, np.float64).ravel()
    if ref_lat.size == 0:
        raise ValueError("nearest_distance_km needs at least one reference point")
    tree = cKDTree(latlon_to_xyz(ref_lat, np.asarray(ref_lon_deg, np.float64).ravel()))
    out = np.empty(lat.size)
    for lo in range(0, lat.size, chunk_rows):
        chord, _ = tree.query(latlon_to_xyz(lat[lo:lo + chunk_rows], lon[lo:lo + chunk_rows]), k=1)
        out[lo:lo + chunk_rows] = 2.0 * EARTH_RADIUS_KM * np.arcsin(np.minimum(chord / 2.0, 1.0))
    return out

# ---- von Mises-Fisher on S^2 ----------------------------------------------------


def vmf_log_normalizer(log_kappa: torch.Tensor) -> torch.Tensor:
    """log C(kappa) of the vMF density on S^2 written relative to the mode.

    With vMF(y; mu, kappa) = kappa / (4 pi sinh kappa) * exp(kappa mu.y)
                           = C(kappa) * exp(-kappa |y - mu|^2 / 2),
    C(kappa) = kappa / (2 pi (1 - exp(-2 kappa))), so

        log C = log kappa - log 2 pi - log(1 - exp(-2 kappa)).

    ``log(-expm1(-2 kappa))`` keeps this exact for every kappa: for kappa -> 0
    it tends to log(2 kappa), so log C -> -log 4 pi (the uniform density) with
    no cancellation; for kappa -> inf the last term vanishes. No sinh, so
    nothing overflows at kappa = 1e9.

    Args:
        log_kappa: natural log of the concentration, any shape.
    Returns:
        log C, same shape (per steradian).
    """
    kappa = torch.exp(log_kappa)
    return log_kappa - LOG_2PI - torch.log(-torch.expm1(-2.0 * kappa))


def vmf_log_density(y: torch.Tensor, mu: torch.Tensor, log_kappa: torch.Tensor) -> torch.Tensor:
    """log vMF(y; mu, kappa) on the unit sphere, in nats per steradian.

    Computed as log kappa - log 2 pi - log(1 - e^{-2 kappa}) - kappa |y - mu|^2 / 2.
    For unit vectors kappa (mu.y - 1) = -kappa |y - mu|^2 / 2, and the right-hand
    side is the one that keeps precision: 1 - mu.y in float32 cancels to
    zero within ~0.3 mrad (2 km), an error of up to ~1 nat at kappa = e^16,
    while the difference y - mu is exact for nearby points.

    Args:
        y: ``[..., 3]`` unit vectors (points).
        mu: ``[..., 3]`` unit vectors (means), broadcastable against ``y``.
        log_kappa: ``[...]`` log concentration, broadcastable against the
            leading dimensions; kappa may be anywhere in [1e-6, 1e9].
    Returns:
        ``[...]`` log-density, differentiable in y, mu and log_kappa.
    """
    sq_chord = (y - mu).pow(2).sum(-1)
    return vmf_log_normalizer(log_kappa) - 0.5 * torch.exp(log_kappa) * sq_chord


# A term more than this far below its row's largest is < 1e-304 (float64) or 1e-37 (float32, float16
# and bf16 are widened) of it: it cannot change the row's sum, but exp() of it takes the CPU's slow
# underflow path. On a 2-core AVX2 EPYC torch.exp of a value whose result underflows cost 4-8x a normal
# one (float32 [1024, 8192]: 230 ms against 31; float64: 258 against 60), and the far components of a
# vMF mixture (kappa (1 - mu . y) up to 2 kappa, ~3e5 at kappa = e^12) make ~99 % of the terms so.
_UNDERFLOW_FLOOR = {torch.float64: -700.0, torch.float32: -85.0}


def _shifted_exp(x: torch.Tensor, dim: int):
    """``(top, e, total, lse)`` along ``dim`` (keepdim): the row maxima (detached, +-inf kept), exp(x - top)
    floored at the dtype's underflow floor (a non-finite top shifts by 0), its row sums, and the row
    logsumexp (-inf for all -inf rows, +inf for rows holding +inf). float16 / bf16 widened to float32."""
    work = x if x.dtype == torch.float64 else x.to(torch.promote_types(x.dtype, torch.float32))
    top = work.detach().amax(dim=dim, keepdim=True)
    finite_top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp((work - finite_top).clamp_min(_UNDERFLOW_FLOOR.get(work.dtype, -85.0)))
    total = e.sum(dim=dim, keepdim=True)
    return top, e, total, torch.where(torch.isinf(top), top, finite_top + torch.log(total))


def logsumexp(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """``torch.logsumexp(x, dim)`` without the slow exponentials of terms that underflow.

    Each term is shifted by its row's maximum and floored at -700 (float64) or -85 (float32),
    where it is below the dtype's resolution of a sum whose largest term is 1: the result
    equals torch.logsumexp's to rounding (a floored term adds at most n e^-700, resp. n e^-85,
    relative; zero in the dtype for n < 10^280, resp. 10^29). Rows that are all -inf give
    -inf, rows holding +inf give +inf, as torch's does. Differentiable (gradient: the softmax,
    zero for floored terms). float16 / bf16 inputs are summed in float32 and returned in their dtype.
    """
    lse = _shifted_exp(x, dim)[3]
    return (lse if keepdim else lse.squeeze(dim)).to(x.dtype)


def softmax_and_logsumexp(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(torch.softmax(x, dim), torch.logsumexp(x, dim))`` from one exponential per term, floored as in
    ``logsumexp`` (a floored term's softmax is e^-700 / e^-85 of the largest instead of its own, smaller,
    value). Rows without a finite maximum give NaN softmax, as torch's does for all -inf rows."""
    top, e, total, lse = _shifted_exp(x, dim)
    soft = torch.where(torch.isfinite(top), e / total, torch.full_like(e, math.nan))
    return soft.to(x.dtype), lse.squeeze(dim).to(x.dtype)


def squared_chord_pairwise(y: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """|y_b - mu_i|^2 for every pair, ``[B, 3] x [c, 3] -> [B, c]``, by differences.

    Differences rather than 2 - 2 y.mu, for the precision reason given in
    ``vmf_log_density``. Memory is B * c * 3 elements: chunk B for large c.
    """
    return (y[:, None, :] - mu[None, :, :]).pow(2).sum(-1)


def vmf_log_density_pairwise(y: torch.Tensor, mu: torch.Tensor, log_kappa: torch.Tensor) -> torch.Tensor:
    """log vMF(y_b; mu_i, kappa_i) for every pair: ``y [B, 3], mu [c, 3], log_kappa [c] -> [B, c]``."""
    return vmf_log_normalizer(log_kappa)[None, :] - 0.5 * torch.exp(log_kappa)[None, :] * squared_chord_pairwise(y, mu)


def vmf_radius_km(log_kappa: float, mass: float = 0.5) -> float:
    """Great-circle radius (km) around the mean holding ``mass`` of a vMF's probability.

    Closed form on S^2: P(angle <= t) = (1 - e^{-kappa (1 - cos t)}) / (1 - e^{-2 kappa}).
    Useful to read kappa: e^16 holds half its mass within ~2.5 km, 16 within ~1900 km.
    """
    kappa = math.exp(log_kappa)
    # Solve for u = 1 - cos t: e^{-kappa u} = 1 - mass (1 - e^{-2 kappa}).
    u = -math.log1p(-mass * -math.expm1(-2.0 * kappa)) / kappa
    # 1 - cos t = 2 sin^2(t/2), accurate for tiny u.
    t = 2.0 * math.asin(min(1.0, math.sqrt(u / 2.0)))
    return EARTH_RADIUS_KM * t
