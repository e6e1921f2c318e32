"""What both the GGUF exporter and the llama.cpp runtime need from llama-cpp-python: quiet logs.

Shared here so that export never imports a runtime's helper. Torch-free.
"""

from __future__ import annotations

import os

_LOG_SINK = None  # the C callback must outlive every call into llama.cpp


def quiet_logs() -> None:
    """Send llama.cpp's and mtmd's logging nowhere (``VLSI_LLAMA_LOG=1`` keeps it)."""
    global _LOG_SINK
    if os.environ.get("VLSI_LLAMA_LOG") or _LOG_SINK is not None:
        return
    import llama_cpp
    from llama_cpp import mtmd_cpp

    _LOG_SINK = llama_cpp.llama_log_callback(lambda level, text, user: None)
    llama_cpp.llama_log_set(_LOG_SINK, None)
    mtmd_cpp.mtmd_log_set(_LOG_SINK, None)
    mtmd_cpp.mtmd_helper_log_set(_LOG_SINK, None)
