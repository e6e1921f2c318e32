"""LLaVA-OneVision (llava-hf/llava-onevision-qwen2-*): SigLIP tower, anyres tiling, Qwen2 decoder."""

from .. import Arch

ARCH = Arch(
    name="llava_onevision",
    model_types=("llava_onevision",),
    spec="vlsi.archs.llava_onevision.spec:LlavaOnevisionSpec",
    hf="vlsi.archs.llava_onevision.hf:LlavaOnevisionAdapter",
    targets={"onnx": "vlsi.archs.llava_onevision.onnx:LlavaOnevisionOnnx",
             "tensorrt": "vlsi.archs.llava_onevision.tensorrt:LlavaOnevisionTensorRT"},
    refused={"gguf": "vlsi writes llama.cpp projectors for Qwen2-VL's merger only, and llama.cpp's clip does not "
                     "run LLaVA-OneVision's anyres_max_9 unpadding and image_newline layout as transformers does; "
                     "export it with --target onnx instead"},
)
