"""vlsi runtimes: one interface over PyTorch, ONNX Runtime, TensorRT and llama.cpp
(installed as ``vlsi_runtimes``).

``load(path, backend="auto")`` takes an export artifact (a folder with ``manifest.json``) or
a checkpoint folder, and returns a :class:`~vlsi_runtimes.base.Runtime` with ``generate``,
``verbalize`` and ``logits``. Non-torch backends never import torch or transformers.
"""

from __future__ import annotations

from pathlib import Path

from vlsi.errors import ConfigError

BACKENDS = ("auto", "torch", "onnx", "gguf", "tensorrt")


def load(path, backend: str = "auto", **kwargs):
    path = Path(path)
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if (path / "manifest.json").is_file():
            import json

            backend = json.loads((path / "manifest.json").read_text()).get("target", "onnx")
        elif (path / "config.json").is_file():
            backend = "torch"
        else:
            raise ConfigError(f"{path} is neither an export artifact (manifest.json) nor a checkpoint (config.json)")
    if backend == "gguf":
        from .llama_backend import LlamaCppRuntime

        return LlamaCppRuntime(path, **kwargs)
    if backend == "tensorrt":  # an ONNX artifact on ONNX Runtime's TensorRT execution provider
        import onnxruntime as ort

        from .onnx_backend import OnnxRuntime

        if "TensorrtExecutionProvider" not in ort.get_available_providers():
            raise ConfigError("backend 'tensorrt': this onnxruntime has no TensorRT execution provider (available: "
                              f"{', '.join(ort.get_available_providers())}); install an onnxruntime-gpu build with "
                              "TensorRT (on a Jetson, NVIDIA's JetPack wheel), or use --backend onnx")
        return OnnxRuntime(path, providers=["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                            "CPUExecutionProvider"], **kwargs)
    if backend == "onnx":
        from .onnx_backend import OnnxRuntime

        return OnnxRuntime(path, **kwargs)
    from .torch_backend import TorchRuntime

    return TorchRuntime(path, **kwargs)
