"""LLaVA-OneVision's TensorRT graphs: its ONNX vision module traced in fp16 at opset 21, and the shared
TensorRT decoder (:mod:`vlsi.archs.tensorrt`)."""

from ..tensorrt import TensorRTGraphs
from .onnx import LlavaOnevisionOnnx


class LlavaOnevisionTensorRT(TensorRTGraphs):
    onnx = LlavaOnevisionOnnx
