"""geo: image geolocation on a feature cache.

Stage one (``geo.pipeline``) turns geotagged images into an HDF5 feature cache;
stage two (``geo.training``) trains only an output head (``geo.heads``) on it --
the Mixture of von Mises-Fisher head (Izbicki et al., ECML-PKDD 2019) or the
PlaNet softmax over adaptive S2 cells -- so heads are compared on exactly the
same features; ``geo.inference`` applies a trained run to new images and
``geo.reports`` compares runs.
"""

import os as _os

from geo.version import __version__

# PyTorch's CPU allocator puts tensors of 2 MiB and more on transparent huge pages
# when this is set (c10 reads it once, at its first such allocation, so it is set
# here, before geo imports torch; an explicit THP_MEM_ALLOC_ENABLE=0 is kept).
# glibc maps every large tensor as fresh 4 KiB pages, and their faults cost more than
# the pass that fills them: measured on a 2-core Zen 4, one thread, a log-softmax of
# [1024, 32768] float32 took 0.099 s into a new tensor on 4 KiB pages, 0.032 s on huge
# pages, 0.027 s into a reused one. (A training step also keeps freed memory for the
# next step: geo.devices.retain_freed_memory.)
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__all__ = ["__version__", "predict"]


def __getattr__(name: str):
    # Lazy: `import geo` stays light (no torch); geo.predict loads geo.inference on first use.
    if name == "predict":
        from geo.inference import predict

        return predict
    raise AttributeError(f"module 'geo' has no attribute {name!r}")
