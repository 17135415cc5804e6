"""Run-wide settings for the test suite.

Under pytest-xdist (`make test` runs two workers, one per core of a 2-core machine) each worker
and every subprocess it starts uses one thread: two workers with two OpenMP threads each would
oversubscribe the cores and spin, which is slower than running the tests one at a time.
"""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
