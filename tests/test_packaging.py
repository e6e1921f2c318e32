"""Installing vlsi puts only project-unique import names into site-packages."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_top_level_names_are_unique(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    wheel = next(tmp_path.glob("vlsi-*.whl"))
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    packages = {t for t in tops if not t.endswith((".dist-info", ".data"))}
    assert packages == {"vlsi", "vlsi_train", "vlsi_export", "vlsi_runtimes", "vlsi_apps", "vlsi_cli"}
    names = zipfile.ZipFile(wheel).namelist()
    assert "vlsi/templates/chat.jinja" in names


def test_import_names():
    import vlsi_apps
    import vlsi_runtimes

    assert Path(vlsi_runtimes.__file__).parent.name == "runtimes"
    assert Path(vlsi_apps.__file__).parent.name == "apps"
