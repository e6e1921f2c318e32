"""Does a vlsi GGUF pair answer in llama.cpp's own tools as the PyTorch model does?

    python scripts/llama_tools_agreement.py CKPT --data DATA [--artifact ART] [--n 30] [--server]

Asks ``--n`` questions of a vlsi data split (LLaVA JSON, e.g. ``vlsi data synth``'s
``test.json``; one image per question) through

- ``torch``: the checkpoint on vlsi's PyTorch runtime (greedy), the reference;
- ``handler``: llama-cpp-python's ``Llama`` with ``MTMDChatHandler``, as a user of those tools
  would call it: plain OpenAI messages (the image as a ``data:image/png;base64`` URI, then the
  question), ``temperature=0`` and the handler's other defaults (``--repeat-penalty`` sets
  one explicitly);
- ``server`` (with ``--server``): llama-cpp-python's OpenAI-compatible server
  (``python -m llama_cpp.server --chat_format mtmd``), the same messages over HTTP.

Without ``--artifact`` the checkpoint is exported first (``--target gguf --quant f16``). Prints
the agreement of each with ``torch`` and every disagreement, and checks that the prompt the
handler renders from the GGUF's chat template tokenises to vlsi's own ids (image tokens
counted as llama.cpp's clip counts them). ``--json FILE`` writes the whole report.
Importable: the tests call :func:`ask_torch`, :func:`ask_handler`, :func:`ask_server`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from vlsi.data.records import IMAGE_PLACEHOLDER


@dataclass(frozen=True)
class Question:
    id: str
    image: Path
    text: str
    """The question without its image placeholder."""
    answer: str
    """The data's reference answer (reported, not compared: agreement is with the model)."""


def questions(data, n: int) -> list[Question]:
    """The first ``n`` one-image questions of a LLaVA JSON file (or of ``test.json`` in a folder)."""
    path = Path(data)
    if path.is_dir():
        path = path / "test.json"
    out = []
    for rec in json.loads(path.read_text()):
        turns = rec.get("conversations") or []
        image = rec.get("image")
        if not isinstance(image, str) or len(turns) < 2:
            continue
        q = turns[0]["value"]
        if q.count(IMAGE_PLACEHOLDER) != 1:
            continue
        q = q.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "").strip()
        out.append(Question(str(rec.get("id", len(out))), path.parent / image, q, turns[1]["value"]))
        if len(out) == n:
            break
    if len(out) < n:
        raise SystemExit(f"{path}: only {len(out)} one-image questions, {n} asked for")
    return out


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def messages(q: Question) -> list[dict]:
    """Plain OpenAI chat messages: one user turn, the image then the question."""
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(q.image)}},
                                         {"type": "text", "text": q.text}]}]


def gguf_files(artifact) -> tuple[Path, Path]:
    """(text model, mmproj) of a GGUF artifact, from its manifest."""
    from vlsi.manifest import load_manifest

    man = load_manifest(artifact)
    return Path(artifact) / man.graph("text").file, Path(artifact) / man.graph("mmproj").file


# --------------------------------------------------------------------------- the three ways to ask


def ask_torch(ckpt, qs: list[Question], max_new_tokens: int = 32) -> list[str]:
    """The PyTorch model's greedy answers (the reference)."""
    import vlsi_runtimes

    rt = vlsi_runtimes.load(ckpt, backend="torch")
    return [rt.generate([str(q.image)], q.text, max_new_tokens=max_new_tokens) for q in qs]


def open_handler(artifact, threads: int = 0, n_ctx: int = 2048):
    """llama-cpp-python's ``Llama`` with ``MTMDChatHandler`` on the artifact's two files, as its
    documentation shows them (nothing set that a user would not set)."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler

    text, mmproj = gguf_files(artifact)
    threads = threads or os.cpu_count() or 1
    return Llama(model_path=str(text), chat_handler=MTMDChatHandler(clip_model_path=str(mmproj), verbose=False),
                 n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)


def ask_handler(artifact, qs: list[Question], max_new_tokens: int = 32, llm=None, **sampling) -> list[str]:
    """Answers of ``Llama.create_chat_completion`` with plain messages and ``temperature=0``;
    ``sampling`` adds other arguments (e.g. ``repeat_penalty=1.0``)."""
    llm = llm or open_handler(artifact)
    out = []
    for q in qs:
        r = llm.create_chat_completion(messages=messages(q), temperature=0.0, max_tokens=max_new_tokens, **sampling)
        out.append(r["choices"][0]["message"]["content"] or "")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_available() -> str | None:
    """None when ``python -m llama_cpp.server`` can start here, else what is missing."""
    try:
        import fastapi  # noqa: F401
        import pydantic_settings  # noqa: F401
        import sse_starlette  # noqa: F401
        import starlette_context  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        return f"llama_cpp.server needs {e.name} (pip install fastapi sse-starlette starlette-context " \
               "pydantic-settings uvicorn)"
    return None


@contextlib.contextmanager
def llama_server(artifact, threads: int = 0, n_ctx: int = 2048, timeout: float = 120.0):
    """llama-cpp-python's OpenAI-compatible server on the artifact, on a free local port;
    yields its base URL and stops it afterwards."""
    text, mmproj = gguf_files(artifact)
    port = _free_port()
    threads = threads or os.cpu_count() or 1
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(text), "--clip_model_path", str(mmproj),
           "--chat_format", "mtmd", "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx),
           "--n_threads", str(threads), "--n_threads_batch", str(threads), "--verbose", "False"]
    log = open(os.devnull, "wb") if not os.environ.get("VLSI_LLAMA_LOG") else None
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT if log else None)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {proc.returncode} (run with VLSI_LLAMA_LOG=1 "
                                   f"to see why): {' '.join(cmd)}")
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=2):
                    break
            except OSError:
                if time.monotonic() - t0 > timeout:
                    raise RuntimeError(f"llama_cpp.server did not answer within {timeout:.0f} s") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log:
            log.close()


def ask_server(url: str, qs: list[Question], max_new_tokens: int = 32, **sampling) -> list[str]:
    """Answers of the server's ``/v1/chat/completions``, plain messages, ``temperature=0``."""
    out = []
    for q in qs:
        body = json.dumps({"model": "m", "messages": messages(q), "temperature": 0.0, "max_tokens": max_new_tokens,
                           **sampling}).encode()
        req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            out.append(json.loads(r.read())["choices"][0]["message"]["content"] or "")
    return out


# --------------------------------------------------------------------------- the prompt itself


def handler_prompt(llm, q: Question) -> tuple[str, list[int]]:
    """The text ``MTMDChatHandler`` renders for ``messages(q)`` and its token ids after
    ``mtmd_tokenize`` (each image as as many image tokens as clip gives it), the handler's own
    steps (template options, media marker, ``add_special=True``) without decoding anything."""
    import ctypes

    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from llama_cpp import llama_chat_format as lcf

    h = llm.chat_handler
    h._init_mtmd_context(llm)
    mt = h._mtmd_cpp
    marker = mt.mtmd_default_marker().decode()
    msgs = messages(q)
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[lcf.Jinja2ChatFormatter.IgnoreGenerationTags, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lcf.Jinja2ChatFormatter.tojson
    template = env.from_string(h._get_chat_template(llm))
    text = template.render(messages=h._get_template_messages(msgs, marker), add_generation_prompt=True,
                           eos_token="", bos_token="", raise_exception=lambda m: None)
    text = h._postprocess_template_text(text, h.get_image_urls(msgs), marker)

    image_id = llm.tokenize(b"<|image_pad|>", add_bos=False, special=True)[0]
    raw = h.load_image(h.get_image_urls(msgs)[0])
    bitmap = h._create_bitmap_from_bytes(raw)
    chunks = mt.mtmd_input_chunks_init()
    try:
        inp = mt.mtmd_input_text()
        b = text.encode()
        inp.text, inp.text_len, inp.add_special, inp.parse_special = b, len(b), True, True
        arr = (mt.mtmd_bitmap_p_ctypes * 1)(bitmap)
        rc = mt.mtmd_tokenize(h.mtmd_ctx, chunks, ctypes.byref(inp), arr, 1)
        if rc != 0:
            raise RuntimeError(f"mtmd_tokenize returned {rc}")
        ids: list[int] = []
        for i in range(mt.mtmd_input_chunks_size(chunks)):
            c = mt.mtmd_input_chunks_get(chunks, i)
            if mt.mtmd_input_chunk_get_type(c) == mt.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                p = mt.mtmd_input_chunk_get_tokens_text(c, ctypes.byref(n))
                ids += [p[j] for j in range(n.value)]
            else:
                ids += [image_id] * int(mt.mtmd_input_chunk_get_n_tokens(c))
    finally:
        mt.mtmd_input_chunks_free(chunks)
        mt.mtmd_bitmap_free(bitmap)
    return text, ids


def vlsi_prompt_ids(ckpt, q: Question) -> list[int]:
    """The ids vlsi's PyTorch runtime feeds the model for the same question."""
    import vlsi_runtimes

    return list(vlsi_runtimes.load(ckpt, backend="torch").encode([str(q.image)], q.text).ids)


# --------------------------------------------------------------------------- report


def compare(reference: list[str], other: list[str], qs: list[Question]) -> dict:
    """Exact-match agreement and the disagreements."""
    diff = [{"id": q.id, "question": q.text, "torch": a, "other": b} for q, a, b in zip(qs, reference, other) if a != b]
    return {"agree": len(qs) - len(diff), "n": len(qs), "rate": (len(qs) - len(diff)) / max(1, len(qs)),
            "disagreements": diff}


def export_gguf(ckpt, out) -> Path:
    from vlsi_export import export

    return export(str(ckpt), str(out), target="gguf", quant="f16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", type=Path, help="The checkpoint folder (the PyTorch reference).")
    ap.add_argument("--data", type=Path, required=True, help="A LLaVA JSON file or a folder with test.json.")
    ap.add_argument("--artifact", type=Path, help="A GGUF artifact of the checkpoint (default: export one).")
    ap.add_argument("--out", type=Path, help="Where to export when no --artifact is given (default: <ckpt>-gguf).")
    ap.add_argument("--n", type=int, default=30, help="Questions asked.")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeat-penalty", type=float, default=None,
                    help="Pass repeat_penalty explicitly (default: the handler's own default, 1.1).")
    ap.add_argument("--server", action="store_true", help="Also ask llama_cpp.server.")
    ap.add_argument("--json", type=Path, help="Write the report here.")
    a = ap.parse_args()

    from vlsi.llama_cpp import quiet_logs

    quiet_logs()
    artifact = a.artifact
    if artifact is None:
        artifact = a.out or a.ckpt.with_name(a.ckpt.name + "-gguf")
        if not (artifact / "manifest.json").is_file():
            print(f"exporting {a.ckpt} to {artifact} (gguf, f16)")
            export_gguf(a.ckpt, artifact)
    qs = questions(a.data, a.n)
    sampling = {} if a.repeat_penalty is None else {"repeat_penalty": a.repeat_penalty}
    report: dict = {"ckpt": str(a.ckpt), "artifact": str(artifact), "n": len(qs), "sampling": sampling}

    ref = ask_torch(a.ckpt, qs, a.max_new_tokens)
    llm = open_handler(artifact)
    text, ids = handler_prompt(llm, qs[0])
    want = vlsi_prompt_ids(a.ckpt, qs[0])
    report["template"] = {"same_ids": ids == want, "handler_text": text, "handler_ids": ids, "vlsi_ids": want}
    img = llm.tokenize(b"<|image_pad|>", add_bos=False, special=True)[0]
    print(f"prompt of {qs[0].id}: the handler's ids {'==' if ids == want else '!='} vlsi's ({len(ids)} vs "
          f"{len(want)} tokens, {ids.count(img)} vs {want.count(img)} image tokens)")
    if ids != want:
        print(f"  the handler renders: {text!r}")
    runs = {"handler": ask_handler(artifact, qs, a.max_new_tokens, llm=llm, **sampling)}
    if a.server:
        why = server_available()
        if why:
            print(f"server: skipped, {why}")
        else:
            with llama_server(artifact) as url:
                runs["server"] = ask_server(url, qs, a.max_new_tokens, **sampling)
    for name, answers in runs.items():
        r = report[name] = compare(ref, answers, qs)
        print(f"{name}: {r['agree']}/{r['n']} agree with torch ({100 * r['rate']:.1f}%)")
        for d in r["disagreements"]:
            print(f"  {d['id']}: {d['question']!r}\n    torch:   {d['torch']!r}\n    {name + ':':8} {d['other']!r}")
    if a.json:
        a.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
