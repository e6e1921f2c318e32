"""Time llama-cpp-python's own high-level API on a vlsi GGUF artifact: the engine's figure
that vlsi's llama.cpp backend should match (same file, same threads, same token counts).

    python scripts/llama_cpp_reference.py runs/bench/gguf-q8_0 --threads 2

Prints one JSON line: time to first token and decode tokens/s (medians of --runs) for the
text prompt ``vlsi bench`` sends (same words and chat layout, without its image) followed by
--new-tokens greedy tokens (end of sequence ignored), as ``vlsi bench`` counts them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()

    from llama_cpp import Llama

    m = json.loads((a.artifact / "manifest.json").read_text())
    llm = Llama(model_path=str(a.artifact / m["text"]["file"]), n_ctx=4096, n_threads=a.threads,
                n_threads_batch=a.threads, verbose=False)
    # the prompt `vlsi bench` sends (its chat layout, without the image)
    from tokenizers import Tokenizer

    from vlsi.chat import chat_ids
    from vlsi.data.records import Turn

    tok = Tokenizer.from_file(str(a.artifact / "tokenizer.json"))
    text = " ".join(["word"] * max(1, a.prompt_tokens - 30))
    prompt, _ = chat_ids(tok, [Turn("user", text)], "", for_generation=True)
    tps, ttft = [], []
    for _ in range(a.runs + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
        t1 = time.perf_counter()
        for _ in range(a.new_tokens - 1):
            llm.eval([tok])
            tok = int(llm.scores[llm.n_tokens - 1].argmax())
        t2 = time.perf_counter()
        ttft.append(t1 - t0)
        tps.append((a.new_tokens - 1) / (t2 - t1))
    print(json.dumps({"artifact": str(a.artifact), "engine": "llama-cpp-python Llama.eval", "prompt_tokens": len(prompt),
                      "ttft_s": statistics.median(ttft[1:]), "decode_tok_s": statistics.median(tps[1:])}))


if __name__ == "__main__":
    main()
