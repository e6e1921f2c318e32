"""Qwen2-VL's TensorRT graphs: its ONNX vision module traced in fp16 at opset 21, and the shared
TensorRT decoder (:mod:`vlsi.archs.tensorrt`)."""

from ..tensorrt import TensorRTGraphs
from .onnx import Qwen2VLOnnx


class Qwen2VLTensorRT(TensorRTGraphs):
    onnx = Qwen2VLOnnx
