"""geo: image geolocation on a feature cache.

Stage one (``geo.pipeline``) turns geotagged images into an HDF5 feature cache;
stage two (``geo.training``) trains only an output head (``geo.heads``) on it --
the Mixture of von Mises-Fisher head (Izbicki et al., ECML-PKDD 2019) or the
PlaNet softmax over adaptive S2 cells -- so heads are compared on exactly the
same features; ``geo.inference`` applies a trained run to new images and
``geo.reports`` compares runs.
"""

from geo.version import __version__

__all__ = ["__version__", "predict"]


def __getattr__(name: str):
    # Lazy: `import geo` stays light (no torch); geo.predict loads geo.inference on first use.
    if name == "predict":
        from geo.inference import predict

        return predict
    raise AttributeError(f"module 'geo' has no attribute {name!r}")
