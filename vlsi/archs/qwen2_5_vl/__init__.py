"""Qwen2.5-VL (Qwen/Qwen2.5-VL-*): Qwen2-VL with a windowed-attention vision tower."""

from .. import Arch

ARCH = Arch(
    name="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    spec="vlsi.archs.qwen2_5_vl.spec:Qwen25VLSpec",
    hf="vlsi.archs.qwen2_5_vl.hf:Qwen25VLAdapter",
    targets={"onnx": "vlsi.archs.qwen2_5_vl.onnx:Qwen25VLOnnx",
             "gguf": "vlsi.archs.qwen2_5_vl.gguf:Qwen25VLGguf", "tensorrt": "vlsi.archs.qwen2_5_vl.tensorrt:Qwen25VLTensorRT"},
)
