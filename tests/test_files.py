"""geo.files: atomic writes leave the old file or the new one, never a torn one; a full disk is one readable error."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import geo.files
from geo.errors import DiskError, disk_errno
from geo.files import atomic_torch_save, atomic_write, atomic_write_bytes, temporary_path
from support.disk import FullDisk


def test_a_full_disk_keeps_the_old_file_names_it_and_removes_the_temporary(tmp_path, monkeypatch):
    target = tmp_path / "config.json"
    target.write_text("old")
    monkeypatch.setattr(geo.files, "open", FullDisk(3).open, raising=False)
    with pytest.raises(DiskError, match=f"no space left on device while writing {target}: free space"):
        atomic_write_bytes(target, b"new contents")
    assert target.read_text() == "old"
    assert not temporary_path(target).exists()


def test_a_checkpoint_save_on_a_full_disk_is_a_disk_error_not_torchs_enforce_fail(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    atomic_torch_save(target, {"w": torch.arange(10)})
    disk = FullDisk(1000)
    monkeypatch.setattr(geo.files, "open", disk.open, raising=False)
    with pytest.raises(DiskError, match="checkpoint.pt"):
        atomic_torch_save(target, {"w": torch.zeros(10_000)})
    assert disk.failures == 1
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.arange(10))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_other_errors_keep_their_type(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with atomic_write(tmp_path / "a.txt", "w") as handle:
            handle.write("x")
            1 / 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("err, code", [
    (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),
    (OSError(errno.EIO, "Input/output error"), errno.EIO),
    # h5py's wording of HDF5's failed write (the errno only in the text)
    (OSError("Can't write data (file write failed: time = Sun Nov 29, filename = 'c.h5.partial', file descriptor = 5,"
             " errno = 28, error message = 'No space left on device', buf = 0x5, total write size = 8192)"),
     errno.ENOSPC),
    (RuntimeError("[Errno 122] Disk quota exceeded"), 122),
    (OSError(errno.ENOENT, "No such file or directory"), None),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"), None),
])
def test_disk_errno_reads_the_errno_from_every_wording(err, code):
    assert disk_errno(err) == code


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this platform")
def test_a_real_enospc_from_the_kernel_is_recognised():
    # /dev/full answers every write with ENOSPC: the kernel's own error, no mount needed.
    with pytest.raises(OSError) as caught:
        with open("/dev/full", "wb", buffering=0) as handle:
            handle.write(b"x")
    assert disk_errno(caught.value) == errno.ENOSPC


def test_the_cli_prints_a_disk_error_as_one_line_exit_2(tmp_path, monkeypatch):
    """A writer that does not name its file itself still gives one line, not a traceback."""
    import click

    from geo.cli.group import _Group

    @click.group(cls=_Group)
    def group():
        pass

    @group.command()
    def fill():
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "big.bin"))

    result = CliRunner().invoke(group, ["fill"])
    assert result.exit_code == 2
    assert result.output.strip() == f"Error: no space left on device while writing {tmp_path / 'big.bin'}: " \
                                    "free space (or write elsewhere) and rerun the same command"


def test_check_file_sha256_refuses_a_missing_or_changed_file_with_its_own_messages(tmp_path):
    import hashlib

    from geo.errors import ConfigError
    from geo.files import check_file_sha256

    path = tmp_path / "backbone.pt"
    path.write_bytes(b"weights")
    recorded = hashlib.sha256(b"weights").hexdigest()
    check_file_sha256(path, recorded, missing="gone", changed=lambda actual: f"now {actual}")  # the same bytes: fine
    path.write_bytes(b"other weights")
    with pytest.raises(ConfigError, match=f"^now {hashlib.sha256(b'other weights').hexdigest()}$"):
        check_file_sha256(path, recorded, missing="gone", changed=lambda actual: f"now {actual}")
    path.unlink()
    with pytest.raises(ConfigError, match="^gone$"):
        check_file_sha256(path, recorded, missing="gone", changed=lambda actual: f"now {actual}")
