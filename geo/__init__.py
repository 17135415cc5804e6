"""geo: image geolocation on a feature cache.

Stage one (``geo.pipeline``) turns geotagged images into an HDF5 feature cache;
stage two (``geo.heads``) trains only an output head on it -- the Mixture of
von Mises-Fisher head (Izbicki et al., ECML-PKDD 2019) or the PlaNet softmax
over adaptive S2 cells -- so heads are compared on exactly the same features.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import geo` stays light (no torch); geo.predict loads geo.inference on first use.
    if name == "predict":
        from geo.inference import predict

        return predict
    raise AttributeError(f"module 'geo' has no attribute {name!r}")
