"""Qwen2.5-VL's TensorRT graphs: its ONNX vision module traced in fp16 at opset 21, and the shared
TensorRT decoder (:mod:`vlsi.archs.tensorrt`)."""

from ..tensorrt import TensorRTGraphs
from .onnx import Qwen25VLOnnx


class Qwen25VLTensorRT(TensorRTGraphs):
    onnx = Qwen25VLOnnx
