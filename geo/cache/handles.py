"""How many HDF5 files this process still holds open: the CLI's exit path asks before it leaves.

A write that fails on a full disk can leave HDF5 holding a file whose dirty buffers it
can never flush (closing it fails; touching its handle can even crash). HDF5's own
clean-up at interpreter exit then tries again and dies with SIGSEGV (exit 139), after
geo has already printed its clear error. The CLI checks here on its error path and,
when a file is still open, leaves with ``os._exit`` and the documented error status,
skipping that clean-up. The cache on disk is safe either way: only blocks whose
commit record verifies are kept by the next run (``geo.cache.writer``).
"""

from __future__ import annotations

import sys


def open_hdf5_files() -> int:
    """The number of HDF5 files open in this process (0 when h5py was never imported)."""
    h5py = sys.modules.get("h5py")
    if h5py is None:
        return 0
    return int(h5py.h5f.get_obj_count(types=h5py.h5f.OBJ_FILE))
