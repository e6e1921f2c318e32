"""Time `vlsi serve` end to end, per model: start the server, send streaming chat requests
with an image from the data, and print time to first token (client side), tokens/s and the
server's resident memory. Usage:

    python scripts/measure_serve.py --data runs/quickstart/data/test.json MODEL_OR_ARTIFACT...
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_mb(pid: int) -> tuple[float, float]:
    f = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(f["VmRSS"].split()[0]) / 1024, int(f["VmHWM"].split()[0]) / 1024


def measure(model: str, records: list[dict], root: Path, runs: int, max_tokens: int) -> dict:
    port = _port()
    proc = subprocess.Popen([sys.executable, "-m", "vlsi_cli", "serve", model, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=open(os.devnull, "w") if os.environ.get("QUIET") else None)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                health = httpx.get(f"{url}/health", timeout=1).json()
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        idle_rss, _ = _mem_mb(proc.pid)
        ttft, tps = [], []
        for i in range(runs + 1):
            rec = records[i % len(records)]
            img = base64.b64encode((root / rec["image"]).read_bytes()).decode()
            q = rec["conversations"][0]["value"].replace("<image>", "").strip()
            body = {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{img}"}},
                {"type": "text", "text": q}]}], "max_tokens": max_tokens, "stream": True}
            t0, first, last = time.perf_counter(), None, None
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    ev = json.loads(line[6:])
                    if ev["choices"][0]["delta"].get("content") and first is None:
                        first = time.perf_counter() - t0
                    if "usage" in ev:
                        last = ev
            if i == 0:
                continue  # warm-up
            ttft.append(first)
            tps.append(last["vlsi"]["tokens_per_s"])
        rss, hwm = _mem_mb(proc.pid)
        return {"model": model, "backend": health["backend"], "ttft_s": statistics.median(ttft),
                "tokens_per_s": statistics.median(tps), "rss_idle_mb": idle_rss, "rss_mb": rss, "peak_rss_mb": hwm}
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data", required=True, help="LLaVA-style JSON with image paths relative to it")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    records = json.loads(Path(a.data).read_text())[:a.runs + 1]
    rows = [measure(m, records, Path(a.data).parent, a.runs, a.max_tokens) for m in a.models]
    print("| model | backend | TTFT (s) | tokens/s | RSS idle (MB) | peak RSS (MB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['backend']} | {r['ttft_s']:.4f} | {r['tokens_per_s']:.1f} | "
              f"{r['rss_idle_mb']:.0f} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
