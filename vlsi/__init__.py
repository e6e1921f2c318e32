"""vlsi: VLsI distillation for small vision-language models, from training to the edge.

The core package is import-light on purpose: nothing here imports torch at import time, so
edge runtimes (ONNX Runtime, llama.cpp) can use the data, tokenizer and manifest code alone.
"""

__version__ = "0.1.0"
