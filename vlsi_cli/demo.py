"""``vlsi demo``: the quickstart's VLsI student behind ``vlsi serve``, made on first use.

A pipeline (train if missing, export, serve), so it lives with the command line, the one
layer that may use training, export and the apps together."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def demo_model(quickstart_out="runs/quickstart", recipe=None) -> Path:
    """The model the demo serves: the quickstart student as an ONNX artifact with its
    verbalizers (exported once, parity-checked) when onnxruntime is installed, else the checkpoint.
    Runs the quickstart first if its output is missing."""
    out = Path(quickstart_out)
    ckpt = out / "vlsi"
    if not (ckpt / "vlsi.json").is_file():
        from vlsi_train.quickstart import quickstart

        print(f"vlsi demo: no quickstart output in {out}; running the quickstart first (about 15 minutes)")
        quickstart(out, recipe=recipe)
    if importlib.util.find_spec("onnxruntime") is None:
        return ckpt
    artifact = out / "vlsi-onnx"
    if not (artifact / "manifest.json").is_file():
        from vlsi_export import export

        print(f"vlsi demo: exporting {ckpt} to {artifact} (ONNX fp32, verbalizers kept)")
        export(ckpt, artifact, target="onnx", verbalizers=True, data=str(out / "data" / "test.json"))
    return artifact


def demo(model=None, quickstart_out="runs/quickstart", host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``model``, or the quickstart's student (see :func:`demo_model`), on ``host:port``."""
    from vlsi_apps.server import serve

    serve(model or demo_model(quickstart_out), host=host, port=port)
