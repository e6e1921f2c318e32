"""The layering is true: who may import whom, checked on the import graph of the source (lazy
imports inside functions included), and the torch-free modules imported where torch and
transformers cannot be."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# import name -> folder on disk (the design card's folders keep their short names)
PACKAGES = {"vlsi": "vlsi", "vlsi_train": "vlsi_train", "vlsi_export": "vlsi_export",
            "vlsi_runtimes": "runtimes", "vlsi_apps": "apps", "vlsi_cli": "vlsi_cli"}
HEAVY = ("torch", "transformers", "peft", "torchvision")

# package -> packages it must never import
FORBIDDEN = {
    "vlsi": {"vlsi_train", "vlsi_export", "vlsi_runtimes", "vlsi_apps", "vlsi_cli"},
    "vlsi_train": {"vlsi_export", "vlsi_runtimes", "vlsi_apps", "vlsi_cli"},
    "vlsi_export": {"vlsi_train", "vlsi_apps", "vlsi_cli"},
    "vlsi_runtimes": {"vlsi_train", "vlsi_export", "vlsi_apps", "vlsi_cli"},
    "vlsi_apps": {"vlsi_train", "vlsi_export", "vlsi_cli"},
}

# modules that must import neither torch nor transformers, and only each other inside the project
TORCH_FREE = [
    "vlsi", "vlsi.errors", "vlsi.images", "vlsi.chat", "vlsi.manifest", "vlsi.llama_cpp", "vlsi.tokenizer",
    "vlsi.atomic", "vlsi.data", "vlsi.data.records", "vlsi.data.loaders",
    "vlsi.archs", "vlsi.archs.spec", "vlsi.archs.processor", "vlsi.archs.rope",
    "vlsi.archs.qwen2_vl", "vlsi.archs.qwen2_vl.spec", "vlsi.archs.qwen2_vl.image", "vlsi.archs.qwen2_vl.positions",
    "vlsi.archs.qwen2_5_vl", "vlsi.archs.qwen2_5_vl.spec", "vlsi.archs.qwen2_5_vl.vision",
    "vlsi.archs.llava_onevision", "vlsi.archs.llava_onevision.spec", "vlsi.archs.llava_onevision.image",
    "vlsi_runtimes", "vlsi_runtimes.base", "vlsi_runtimes.onnx_backend", "vlsi_runtimes.llama_backend",
    "vlsi_runtimes.tensorrt_backend", "vlsi_runtimes.tensorrt_engine",
    # what `vlsi build` runs on a Jetson: TensorRT, no torch
    "vlsi_export.trt_presets", "vlsi_export.trt_check", "vlsi_export.trt_build", "vlsi_export.tolerances",
    "vlsi_apps", "vlsi_apps.server",
]
# the one lazy edge out of the torch-free set: the torch backend, loaded only when asked for
ALLOWED_EDGES = {("vlsi_runtimes", "vlsi_runtimes.torch_backend")}


def _modules() -> dict[str, Path]:
    out = {}
    for name, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([name, *parts])] = path
    return out


MODULES = _modules()


def _imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names, line) for every import in the file, lazy ones included."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [a.name for a in node.names]
            out.append((base, names, node.lineno))
            # `from pkg import module` imports a module too
            out += [(f"{base}.{n}", [], node.lineno) for n in names if f"{base}.{n}" in MODULES]
    return out


def _top(name: str) -> str:
    return name.split(".")[0]


def test_every_package_folder_is_scanned():
    assert {"vlsi.archs.qwen2_vl.spec", "vlsi_runtimes.onnx_backend", "vlsi_apps.server", "vlsi_cli"} <= set(MODULES)


def test_no_layer_imports_above_itself():
    bad = []
    for mod, path in MODULES.items():
        for target, _, line in _imports(mod, path):
            if _top(target) in FORBIDDEN.get(_top(mod), ()):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_export_uses_no_private_runtime_helper():
    bad = []
    for mod, path in MODULES.items():
        if _top(mod) != "vlsi_export":
            continue
        for target, names, line in _imports(mod, path):
            if _top(target) == "vlsi_runtimes" and (any(n.startswith("_") for n in names) or "._" in target):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {names} from {target}")
    assert not bad, "\n".join(bad)


def test_training_never_launches_the_cli():
    for mod, path in MODULES.items():
        if _top(mod) == "vlsi_train":
            text = path.read_text()
            assert "vlsi_cli" not in text and '"vlsi.cli"' not in text, path


def test_torch_free_modules_stay_torch_free():
    assert set(TORCH_FREE) <= set(MODULES)
    bad = []
    for mod in TORCH_FREE:
        for target, _, line in _imports(mod, MODULES[mod]):
            where = f"{MODULES[mod].relative_to(ROOT)}:{line}"
            if _top(target) in HEAVY:
                bad.append(f"{where} imports {target}")
            elif target in MODULES and target not in TORCH_FREE and (mod, target) not in ALLOWED_EDGES:
                bad.append(f"{where} imports {target}, which is not in the torch-free set")
    assert not bad, "\n".join(bad)


def test_the_layering_test_can_fail():
    """The parser sees lazy imports and relative imports (a rule that saw nothing would pass)."""
    found = {t for t, _, _ in _imports("vlsi_runtimes", MODULES["vlsi_runtimes"])}
    assert "vlsi_runtimes.torch_backend" in found  # lazy, inside load()
    found = {t for t, _, _ in _imports("vlsi.archs.qwen2_5_vl.spec", MODULES["vlsi.archs.qwen2_5_vl.spec"])}
    assert "vlsi.archs.qwen2_vl.spec" in found  # relative, two levels


@pytest.mark.slow
def test_torch_free_modules_import_where_torch_cannot():
    code = f"""
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r}:
            raise ImportError(f"{{name}} must not be imported here")
sys.meta_path.insert(0, Refuse())
for m in {TORCH_FREE!r}:
    importlib.import_module(m)
from vlsi.archs import get_spec, supported
for a in supported():
    get_spec(a)
print("ok")
"""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
