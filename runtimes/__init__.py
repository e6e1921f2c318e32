"""vlsi runtimes: one interface over PyTorch, ONNX Runtime, TensorRT and llama.cpp (installed as ``vlsi_runtimes``)."""
