"""The predicted probability of each pixel of an equirectangular world map, for reports and ``geo predict --map``.

The probability mass of each 1° pixel (log10) is drawn, not the density at pixel
centres, because a component with κ = e^16 is ~2.5 km wide and its density
sampled at pixel centres would be zero almost everywhere. For a head whose
density is a vMF mixture (``head.vmf_mixture``), components narrower than a pixel
put their weight Γ_i in the pixel holding μ_i and the others are integrated as
density x pixel area, over the ``MAX_COMPONENTS`` heaviest components; any other
head is drawn as ``head.log_density`` x pixel area.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from geo.geometry import latlon_to_xyz, logsumexp, vmf_log_density_pairwise, xyz_to_latlon
from geo.worldmap.world import lat_lon_grid, pixel_index

N_LON = 360  # density maps: 360 x 180 pixels of 1°
MAX_COMPONENTS = 1024  # heaviest MvMF components integrated per image; the rest weigh < the 1024th each


def pixel_log10_mass(head, logits: torch.Tensor, n_lon: int = N_LON) -> np.ndarray:
    """log10 of the predicted probability of each pixel, [n_lon/2, n_lon], for one image's head output (logits [c])."""
    lat, lon, area = lat_lon_grid(n_lon)
    grid = torch.as_tensor(latlon_to_xyz(lat.ravel(), lon.ravel()))
    with torch.no_grad():
        mixture = head.vmf_mixture(logits)
        if mixture is not None:  # a vMF mixture: see the module docstring
            log_w = mixture.log_weights
            top = torch.topk(log_w, min(MAX_COMPONENTS, log_w.shape[0])).indices
            log_w, mu, log_kappa = log_w[top], mixture.mu_xyz[top], mixture.log_kappa[top]
            # Narrow: the component's angular s.d. 1/sqrt(κ) is under one pixel, too fine to sample.
            narrow = log_kappa > -2 * math.log(math.radians(360 / n_lon))
            mass = np.zeros(lat.size)
            if (~narrow).any():
                log_dens = logsumexp(log_w[~narrow] + vmf_log_density_pairwise(
                    grid, mu[~narrow], log_kappa[~narrow]), dim=-1)
                mass += np.exp(log_dens.numpy()) * area.ravel()
            if narrow.any():
                mu_lat, mu_lon = xyz_to_latlon(mu[narrow].numpy())
                np.add.at(mass, pixel_index(mu_lat, mu_lon, n_lon), np.exp(log_w[narrow].numpy()))
            with np.errstate(divide="ignore"):
                return np.log10(mass).reshape(lat.shape)
        log_dens = head.log_density(logits[None].float(), grid.float())[0].double().numpy()
        return ((log_dens + np.log(area.ravel())) / math.log(10)).reshape(lat.shape)
