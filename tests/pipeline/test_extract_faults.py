"""Extraction meeting a full disk, a kill after its final rename, and the reproducibility of its checkpoint."""

from __future__ import annotations

import errno
import hashlib
import json
import sys
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from support.caches import file_content  # noqa: E402
from support.images import write_dataset  # noqa: E402

from geo.cli import cli  # noqa: E402
from geo.errors import CacheError  # noqa: E402
from geo.pipeline.extract import ExtractConfig, run_extract  # noqa: E402

TINY = dict(backbone="resnet18", image_size=32, batch_size=4, finetune_epochs=0, precision="fp32", workers=0)
CLI = ["--backbone", "resnet18", "--image-size", "32", "--finetune-epochs", "0", "--batch-size", "4", "--workers", "0"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same_cache(a: Path, b: Path) -> None:
    ca, cb = file_content(a), file_content(b)
    assert sorted(ca) == sorted(cb)
    for key in ca:
        if key not in ("@checkpoint_path",):  # each run has its own checkpoint folder
            assert str(ca[key].tolist() if hasattr(ca[key], "tolist") else ca[key]) == \
                str(cb[key].tolist() if hasattr(cb[key], "tolist") else cb[key]), key


def test_a_finished_extract_without_its_config_json_is_recognised_and_the_config_rewritten(tmp_path):
    manifest = write_dataset(tmp_path / "data", 8)
    out = tmp_path / "c.h5"
    first = run_extract(manifest, out, ExtractConfig(**TINY))
    cache_sha, ckpt_sha = _sha(out), _sha(first.checkpoint_path)
    config_text = first.config_path.read_text()
    first.config_path.unlink()  # a kill right after the final rename
    again = run_extract(manifest, out, ExtractConfig(**TINY))
    assert _sha(out) == cache_sha and _sha(again.checkpoint_path) == ckpt_sha  # nothing redone, nothing lost
    assert json.loads(again.config_path.read_text()) == json.loads(config_text)
    third = run_extract(manifest, out, ExtractConfig(**TINY))  # with its config.json: finished, nothing redone
    assert third.already_complete and _sha(out) == cache_sha and third.config_path.read_text() == again.config_path.read_text()
    other = write_dataset(tmp_path / "other", 6)
    again.config_path.unlink()
    with pytest.raises(CacheError, match="made by another job"):  # another manifest: never taken for finished
        run_extract(other, out, ExtractConfig(**TINY, checkpoint_dir=str(tmp_path / "other.checkpoints")))
    assert _sha(out) == cache_sha


@pytest.mark.slow
def test_identical_fine_tunes_give_identical_checkpoints_timings_beside(tmp_path):
    manifest = write_dataset(tmp_path / "data", 8)
    config = dict(TINY, backbone="mobilenet_v3_small", finetune_epochs=1)
    a = run_extract(manifest, tmp_path / "a.h5", ExtractConfig(**config))
    b = run_extract(manifest, tmp_path / "b.h5", ExtractConfig(**config))
    assert _sha(a.checkpoint_path) == _sha(b.checkpoint_path)
    timings = json.loads((a.checkpoint_path.parent / "backbone.timings.json").read_text())
    assert [t["epoch"] for t in timings] == [1] and timings[0]["elapsed_s"] > 0


def test_disk_full_during_extract_is_one_line_and_the_rerun_ends_equal(tmp_path, monkeypatch):
    manifest = write_dataset(tmp_path / "data", 12, corrupt=(5,))
    straight = tmp_path / "a.h5"
    assert CliRunner().invoke(cli, ["extract", str(manifest), "--out", str(straight), *CLI]).exit_code == 0
    out = tmp_path / "b.h5"
    real_flush, calls = h5py.File.flush, []

    def flush(f):  # the disk fills at the third block's data (2 blocks of 4 committed, one image unreadable)
        calls.append(1)
        if len(calls) == 1 + 3 * 2 + 1:
            raise OSError(f"Can't write data (file write failed: errno = {errno.ENOSPC}, "
                          "error message = 'No space left on device')")
        return real_flush(f)

    with monkeypatch.context() as patch:
        patch.setattr(h5py.File, "flush", flush)
        result = CliRunner().invoke(cli, ["extract", str(manifest), "--out", str(out), *CLI])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert f"Error: no space left on device while writing {out}.partial: 7 rows committed; free space and " \
           "rerun to resume" in result.output
    assert not out.exists()
    result = CliRunner().invoke(cli, ["extract", str(manifest), "--out", str(out), *CLI])
    assert result.exit_code == 0, result.output
    _same_cache(straight, out)


@pytest.mark.parametrize("name", ["backbone.pt", "finetune_state.pt"])
def test_a_torn_checkpoint_is_a_clear_error_naming_it(tmp_path, name):
    manifest = write_dataset(tmp_path / "data", 8)
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    (ckpt_dir / name).write_bytes(b"PK\x03\x04 torn")
    result = CliRunner().invoke(cli, ["extract", str(manifest), "--out", str(tmp_path / "c.h5"), *CLI[:-6],
                                      "--finetune-epochs", "1", "--batch-size", "4", "--workers", "0",
                                      "--checkpoint-dir", str(ckpt_dir)])
    assert result.exit_code == 2, result.output
    assert f"Error: {ckpt_dir / name}: cannot be read" in result.output and "delete it" in result.output
    assert "Traceback" not in result.output
