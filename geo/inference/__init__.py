"""``geo predict``: geolocate new images with a trained run.

- ``predictor.py``: ``Predictor`` (a run's head and backbone, loaded once) and ``predict()``;
- ``credible.py``: the radii around a prediction holding 50 % / 95 % of the probability;
- ``maps.py``: each image's predicted density drawn on a world map.
"""

from geo.inference.predictor import (BackboneError, Location, PredictionResult, Predictor, find_images,
                                     format_result, predict)

__all__ = ["BackboneError", "Location", "PredictionResult", "Predictor", "find_images", "format_result", "predict"]
