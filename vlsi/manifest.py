"""The artifact manifest: what an export folder holds, read by runtimes without torch.

``manifest.json`` records the source checkpoint's hash, the target, the precision of every
graph, every file with its sha256, the graphs' input/output signature, the verbalizers kept,
tool versions and the parity report. ``load_manifest`` checks the format version and, with
``verify``, that every listed file exists with its recorded size and hash.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import VLsIError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class ArtifactError(VLsIError):
    """An artifact folder is incomplete, damaged, or from a newer vlsi."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def folder_hash(folder: str | Path, patterns=("*.json", "*.safetensors")) -> str:
    """A stable hash of a checkpoint folder's weights and configs (names and contents)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for pat in patterns:
        for p in sorted(folder.glob(pat)):
            h.update(p.name.encode())
            h.update(sha256_file(p).encode())
    return h.hexdigest()


# reports about an artifact, rewritten by every `vlsi validate`: not part of its hashed payload
REPORTS = frozenset({"parity.json", "parity.md", "parity.png"})


def tool_versions(packages) -> dict[str, str]:
    """Installed versions of ``packages`` (those not installed are left out), for manifests."""
    import importlib.metadata as md

    out = {}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def file_entries(folder: Path) -> dict[str, dict]:
    return {
        str(p.relative_to(folder)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST and p.name not in REPORTS
    }


def write_manifest(folder: Path, manifest: dict) -> Path:
    manifest = {"format_version": FORMAT_VERSION, **manifest, "files": file_entries(folder)}
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def load_manifest(folder: str | Path, verify: bool = True) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: {folder} is not a vlsi export (run `vlsi export` to make one)")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e})") from None
    if m.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(f"{path} has format_version {m['format_version']}, newer than this vlsi reads "
                            f"({FORMAT_VERSION}); upgrade vlsi")
    if verify:
        for name, entry in m.get("files", {}).items():
            f = folder / name
            if not f.is_file():
                raise ArtifactError(f"{f} is listed in {MANIFEST} but missing; re-export the artifact")
            if f.stat().st_size != entry["bytes"]:
                raise ArtifactError(f"{f} is {f.stat().st_size} bytes, the manifest says {entry['bytes']}: "
                                    "truncated or replaced; re-export the artifact")
            if sha256_file(f) != entry["sha256"]:
                raise ArtifactError(f"{f} does not match its sha256 in {MANIFEST}: damaged or replaced")
    return m
