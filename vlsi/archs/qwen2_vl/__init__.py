"""Qwen2-VL (Qwen/Qwen2-VL-*): the paper's backbone."""

from .. import Arch

ARCH = Arch(
    name="qwen2_vl",
    model_types=("qwen2_vl",),
    spec="vlsi.archs.qwen2_vl.spec:Qwen2VLSpec",
    hf="vlsi.archs.qwen2_vl.hf:Qwen2VLAdapter",
    targets={"onnx": "vlsi.archs.qwen2_vl.onnx:Qwen2VLOnnx",
             "tensorrt": "vlsi.archs.qwen2_vl.tensorrt:Qwen2VLTensorRT", "gguf": "vlsi.archs.qwen2_vl.gguf:Qwen2VLGguf"},
)
