"""What both the GGUF exporter and the llama.cpp runtime need from llama-cpp-python: quiet logs,
the CPU check for AMX, llama.cpp's own speculative-decoding tool, and the vlsi fields of a draft
GGUF.

Shared here so that export never imports a runtime's helper. Torch-free.
"""

from __future__ import annotations

import functools
import os

# the vlsi fields of a draft GGUF (vlsi_export.draft writes them, the llama.cpp backend checks them)
DRAFT_LAYER_KEY = "vlsi.draft.layer"
DRAFT_MODEL_KEY = "vlsi.draft.model_sha256"
"""The sha256 of the text model file the draft was cut from (the manifest records the same)."""
DRAFT_VOCAB_KEY = "vlsi.draft.vocab"

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


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX (Linux /proc/cpuinfo flags); False where that cannot be read.
    There, llama.cpp built for the host puts weights in its AMX / repacked buffer types and
    its first ``llama_decode`` of a q8_0 file segfaults (llama-cpp-python 0.3.36 on a Xeon
    with amx_int8, its own ``Llama`` too; f32 and f16 files decode)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_int8" in line.split()
    except OSError:
        pass
    return False


SPECULATIVE_TOOL = "llama-speculative-simple"


def speculative_tool() -> str | None:
    """llama.cpp's own speculative-decoding example: ``$VLSI_LLAMA_SPECULATIVE``, the one
    ``make llama-tools`` builds beside this environment (``<venv>/llama.cpp-tools/bin``), or one
    on ``PATH``; ``None`` when there is none."""
    import shutil
    import sys
    from pathlib import Path

    given = os.environ.get("VLSI_LLAMA_SPECULATIVE")
    if given:
        return given if Path(given).is_file() else None
    built = Path(sys.prefix) / "llama.cpp-tools" / "bin" / SPECULATIVE_TOOL
    return str(built) if built.is_file() else shutil.which(SPECULATIVE_TOOL)


def run_speculative_tool(model, draft, prompt: str, new_tokens: int, draft_max: int, threads: int = 0,
                         p_min: float = 0.0, n_ctx: int = 2048, timeout: float = 600, tries: int = 20) -> dict:
    """One greedy run of llama.cpp's ``llama-speculative-simple`` (target ``model``, draft model
    ``draft``, ``prompt`` as text with its special tokens) -> ``{"text", "tok_s", "n_predict",
    "n_drafted", "n_accept"}`` as the tool prints them (``text``: the answer's bytes read as UTF-8,
    a bad byte as U+FFFD). Raises RuntimeError with its log's end when it fails (a run that ends
    without printing its counts is repeated, ``tries`` times in all)."""
    import re
    import subprocess

    tool = speculative_tool()
    if tool is None:
        raise RuntimeError(f"{SPECULATIVE_TOOL} is not built: run `make llama-tools` (or set VLSI_LLAMA_SPECULATIVE)")
    cmd = [tool, "-m", str(model), "-md", str(draft), "--spec-type", "draft-simple", "-p", prompt,
           "-n", str(new_tokens), "--spec-draft-n-max", str(draft_max), "--spec-draft-n-min", "0",
           "--spec-draft-p-min", str(p_min), "--temp", "0", "--ignore-eos", "-c", str(n_ctx)]
    if cpu_has_amx():
        cmd.append("--no-repack")  # as the backend: llama.cpp's repacked q8_0 buffers crash on AMX CPUs
    if threads:
        cmd += ["-t", str(threads), "-tb", str(threads), "-td", str(threads), "-tbd", str(threads)]
    # llama.cpp's logger prints from a worker thread and is never flushed at exit (common/log.cpp
    # leaks it on purpose), so a run that exits 0 may lose its last lines, the counts among them
    # (on a 2-core machine: none of 40 short runs alone, 23 of 40 with both cores busy, about one
    # in three inside `vlsi bench`). Greedy runs repeat exactly, so such a run is repeated,
    # ``tries`` times at most.
    for _ in range(tries):
        res = subprocess.run(cmd, capture_output=True, timeout=timeout)
        log = res.stderr.decode("utf-8", errors="replace")
        found = {k: re.search(rf"{k}\s*=\s*(\d+)", log) for k in ("n_predict", "n_drafted", "n_accept")}
        speed = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", log)
        if res.returncode != 0 or (speed is not None and all(found.values())):
            break
    if res.returncode != 0 or speed is None or not all(found.values()):
        raise RuntimeError(f"{SPECULATIVE_TOOL} failed (exit {res.returncode}"
                           f"{', its counts not printed' if res.returncode == 0 else ''}):\n{log[-2000:]}")
    # stdout: the prompt, then the answer's pieces (bytes: a piece may end inside a character)
    raw, said = res.stdout, prompt.encode()
    text = (raw.split(said, 1)[-1] if said in raw else raw).decode("utf-8", errors="replace")
    n, secs = int(speed.group(1)), float(speed.group(2))
    return {"text": text.strip("\n"), "tok_s": n / secs if secs > 0 else float("inf"),
            **{k: int(m.group(1)) for k, m in found.items()}}


def read_draft_gguf(path) -> dict:
    """The vlsi fields of a draft GGUF (``{}`` for a file without them)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    out = {}
    if DRAFT_LAYER_KEY in r.fields:
        out["layer"] = int(r.fields[DRAFT_LAYER_KEY].contents())
    if DRAFT_MODEL_KEY in r.fields:
        out["model_sha256"] = str(r.fields[DRAFT_MODEL_KEY].contents())
    if DRAFT_VOCAB_KEY in r.fields:
        out["vocab"] = [int(t) for t in r.fields[DRAFT_VOCAB_KEY].contents()]
    return out
