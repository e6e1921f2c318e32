"""vlsi runtimes: one interface over PyTorch, ONNX Runtime, TensorRT and llama.cpp
(installed as ``vlsi_runtimes``).

``load(path, backend="auto")`` takes an export artifact (a folder with ``manifest.json``) or
a checkpoint folder, and returns a :class:`~vlsi_runtimes.base.Runtime` with ``generate``,
``verbalize`` and ``logits``. Non-torch backends never import torch or transformers.
"""

from __future__ import annotations

from pathlib import Path

from vlsi.errors import ConfigError

from .base import Speculative  # noqa: F401  (``vlsi_runtimes.Speculative``)

BACKENDS = ("auto", "torch", "onnx", "gguf", "tensorrt")


PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
"""Short names of ONNX Runtime's execution providers, for ``providers=`` / ``--providers``."""


def onnx_providers(names) -> list[str] | None:
    """``"tensorrt,cuda,cpu"`` or a list of short or full names -> ONNX Runtime provider names,
    each checked against this onnxruntime build; ``None`` keeps the backend's default."""
    if not names:
        return None
    import onnxruntime as ort

    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    full = [PROVIDERS.get(n.lower(), n) for n in names]
    have = ort.get_available_providers()
    missing = [n for n in full if n not in have]
    if missing:
        raise ConfigError(f"this onnxruntime has no {', '.join(missing)} (available: {', '.join(have)}); for "
                          "TensorRT or CUDA install an onnxruntime-gpu build (on a Jetson, NVIDIA's JetPack wheel)")
    return full


def load(path, backend: str = "auto", providers=None, **kwargs):
    """``backend``: ``auto`` (from the artifact's manifest; ``torch`` for a checkpoint), ``torch``,
    ``onnx``, ``gguf`` or ``tensorrt``. A TensorRT artifact runs on its built engines; with
    ``backend="onnx"`` the same graphs run on ONNX Runtime (the CPU check of what TensorRT
    builds). ``providers`` (ONNX Runtime only, e.g. ``"tensorrt,cuda,cpu"``) runs an ONNX
    artifact on ONNX Runtime's TensorRT or CUDA execution provider."""
    path = Path(path)
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    target = None
    if (path / "manifest.json").is_file():
        import json

        try:
            target = json.loads((path / "manifest.json").read_text()).get("target", "onnx")
        except (ValueError, AttributeError):
            target = "onnx"  # the manifest loader names what is wrong with it
    elif (path / "config.json").is_file():
        target = "checkpoint"
    elif backend == "auto":
        raise ConfigError(f"{path} is neither an export artifact (manifest.json) nor a checkpoint (config.json)")
    if backend == "auto":
        backend = "torch" if target == "checkpoint" else target
    if providers is not None and backend != "onnx":
        raise ConfigError(f"providers= is an option of the onnx backend, not of {backend!r}")
    if target == "tensorrt" and backend in ("tensorrt", "onnx"):
        from .tensorrt_backend import TensorRTRuntime

        engine = "tensorrt" if backend == "tensorrt" else "onnxruntime"
        return TensorRTRuntime(path, engine=engine, providers=onnx_providers(providers), **kwargs)
    if backend == "tensorrt":
        raise ConfigError(f"{path} is not a TensorRT artifact (target {target!r}): export one with "
                          "`vlsi export --target tensorrt`, or run this ONNX artifact on ONNX Runtime's TensorRT "
                          "execution provider with --backend onnx --providers tensorrt,cuda,cpu")
    if backend == "gguf":
        from .llama_backend import LlamaCppRuntime

        return LlamaCppRuntime(path, **kwargs)
    if backend == "onnx":
        from .onnx_backend import OnnxRuntime

        return OnnxRuntime(path, providers=onnx_providers(providers), **kwargs)
    from .torch_backend import TorchRuntime

    return TorchRuntime(path, **kwargs)
