"""Atomic folders and files: all or nothing, published with ordinary permissions."""

from __future__ import annotations

import os
import stat

import pytest

from vlsi.atomic import atomic_dir, atomic_write_text
from vlsi.errors import ConfigError


def test_atomic_dir_publishes_readable_folder(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "art") as tmp:
            (tmp / "sub").mkdir()
            fd = os.open(tmp / "sub" / "weights.bin", os.O_CREAT | os.O_WRONLY, 0o600)  # as some writers do
            os.close(fd)
        atomic_write_text(tmp_path / "art" / "manifest.json", "{}")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)
    assert mode(tmp_path / "art") == 0o755 and mode(tmp_path / "art" / "sub") == 0o755
    assert mode(tmp_path / "art" / "sub" / "weights.bin") == 0o644
    assert mode(tmp_path / "art" / "manifest.json") == 0o644


def test_atomic_dir_leaves_nothing_on_failure_and_refuses_overwrite(tmp_path):
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "art") as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("crash mid-export")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "keep").write_text("old")
    with pytest.raises(ConfigError, match="--overwrite"):
        with atomic_dir(tmp_path / "art"):
            pass
    assert (tmp_path / "art" / "keep").read_text() == "old"
