"""vlsi_export: exporters to ONNX, TensorRT and GGUF, with parity validation."""
