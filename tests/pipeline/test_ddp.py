"""torchrun/DDP on CPU (gloo): two processes give the same cache rows as one (torchvision and timm backbones)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from support.images import write_dataset  # noqa: E402

from geo.cache.store import FeatureCache  # noqa: E402
from geo.pipeline.distributed import shard_range  # noqa: E402
from geo.pipeline.extract import ExtractConfig, run_extract  # noqa: E402


def test_shards_are_contiguous_and_cover_every_row_once():
    for n in (0, 1, 7, 12, 13):
        for world in (1, 2, 3, 5):
            ranges = [shard_range(n, r, world) for r in range(world)]
            assert [i for lo, hi in ranges for i in range(lo, hi)] == list(range(n))
            sizes = [hi - lo for lo, hi in ranges]
            assert max(sizes) - min(sizes) <= 1


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["mobilenet_v3_small", "timm/vit_tiny_patch16_224"])
def test_torchrun_two_processes_equal_one_process(tmp_path, backbone):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    manifest = write_dataset(tmp_path / "data", 13, corrupt=(2, 9))  # odd count: uneven shards
    out = tmp_path / "ddp.h5"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "geo", "extract", str(manifest),
           "--out", str(out), "--backbone", backbone, "--image-size", "32",
           "--finetune-epochs", "1", "--batch-size", "4", "--precision", "fp32", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not list(tmp_path.glob("ddp.h5.rank*")), "shard files must be removed after the join"

    # Reference: one process extracting with the weights the DDP fine-tune saved.
    with FeatureCache(out) as ddp:
        assert ddp.validate() == []
        ckpt = ddp.provenance["checkpoint_path"]
        ref = run_extract(manifest, tmp_path / "one.h5",
                          ExtractConfig(backbone=backbone, weights=ckpt, image_size=32,
                                        finetune_epochs=0, batch_size=4, precision="fp32", device="cpu"))
        with FeatureCache(ref.cache_path) as one:
            assert ddp.ids.tolist() == one.ids.tolist() == [f"id{i:03d}" for i in range(13) if i not in (2, 9)]
            assert list(ddp.skipped) == list(one.skipped) and [i for i, _ in one.skipped] == ["id002", "id009"]
            for key in ("lat_deg", "lon_deg", "split", "country"):
                np.testing.assert_array_equal(getattr(ddp, key), getattr(one, key))
            rows = np.arange(one.n_rows)
            # Batch boundaries differ between shards and one process: equal up to float16 rounding.
            np.testing.assert_allclose(ddp.load_features(rows).astype(np.float32),
                                       one.load_features(rows).astype(np.float32), rtol=2e-3, atol=2e-3)
