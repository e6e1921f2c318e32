"""``vlsi serve``: one model behind an OpenAI-compatible chat API, and the demo page.

Routes: ``POST /v1/chat/completions`` (OpenAI's request and response shapes, SSE when
``stream`` is true), ``GET /v1/models``, ``GET /health``, and the page at ``/``.

The model is loaded once. Requests run one at a time on a single worker thread (a runtime
holds one KV cache); up to ``max_queue`` more wait, and the next gets 429. A streaming client
that disconnects cancels its generation before the next token. Every error is OpenAI's
``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status.

Extra request field ``"verbalize": true`` adds ``"verbalizations"`` to the response: what each
kept verbalizer layer answers, shallow to deep (the paper's Figure 3), decoded greedily.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from vlsi.errors import VLsIError
from vlsi.images import ImageError, decode_data_uri, validate_image

STATIC = Path(__file__).parent / "static"


@dataclass
class Limits:
    """What a request may ask for."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 16_000_000
    """Pixels in one decoded image (a decompression-bomb guard; the header is read first)."""
    max_images: int = 4
    max_tokens: int = 512
    """Cap on ``max_tokens``; also the default when a request leaves it out."""
    max_queue: int = 8
    """Requests that may wait while one runs; the next one gets 429."""
    max_prompt_chars: int = 16_000
    """Characters of text across the whole conversation."""
    max_prompt_tokens: int = 8192
    """Tokens of the rendered conversation (images included)."""
    max_image_tokens: int = 4096
    """Image tokens across the conversation's images (what the vision encoder costs)."""
    verbalize_tokens: int = 32


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------- request parsing


def _image_from_url(url: str, limits: Limits, image_spec=None, param: str = "messages"):
    if not isinstance(url, str):
        raise ApiError(400, "image_url.url must be a string", param=param)
    if not url.startswith("data:"):
        raise ApiError(400, "only base64 data URIs are accepted for images (data:image/png;base64,...); "
                       "remote URLs are refused because this server may run offline", param=param,
                       code="unsupported_image_url")
    try:
        raw = decode_data_uri(url)
    except ImageError as e:
        raise ApiError(400, str(e), param=param, code="invalid_base64") from None
    try:
        return validate_image(raw, image_spec, max_input_pixels=limits.max_image_pixels, source="image_url")
    except VLsIError as e:
        raise ApiError(400, f"image rejected: {e}", param=param, code="invalid_image") from None


def parse_messages(messages, limits: Limits, image_spec=None) -> list[dict]:
    """OpenAI chat messages -> the same conversation for the runtime, every turn kept (system
    prompts, assistant turns, images in any user turn), images decoded and checked against the
    served model's ``image_spec``. The limits apply to the whole conversation: images across
    turns, characters across turns. Errors name the field (``messages[1].content[0]``)."""
    from vlsi.chat import MessageError, conversation

    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list", param="messages")
    try:
        turns, urls = conversation(messages)  # the structure, before any image is decoded
    except MessageError as e:
        raise ApiError(400, str(e), param=e.param) from None
    chars = sum(len(t.text) for t in turns)
    if chars > limits.max_prompt_chars:
        raise ApiError(400, f"the conversation has {chars} characters; the limit is {limits.max_prompt_chars}",
                       param="messages", code="conversation_too_long")
    if len(urls) > limits.max_images:
        raise ApiError(400, f"the conversation has {len(urls)} images; the limit is {limits.max_images}",
                       param="messages", code="too_many_images")
    out = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if isinstance(part, dict) and (part.get("type") == "image_url" or
                                               (part.get("type") is None and "image_url" in part)):
                    iu = part.get("image_url")
                    url = iu.get("url") if isinstance(iu, dict) else iu
                    part = {"type": "image",
                            "image": _image_from_url(url, limits, image_spec, f"messages[{i}].content[{j}]")}
                elif isinstance(part, dict) and part.get("type") == "image":
                    raise ApiError(400, f"messages[{i}].content[{j}]: send images as image_url parts with a data URI",
                                   param=f"messages[{i}].content[{j}].type")
                parts.append(part)
            content = parts
        out.append({"role": m["role"], "content": content})
    return out


def parse_options(body: dict, limits: Limits) -> dict:
    def num(name, default, lo, hi, kind=float):
        v = body.get(name, default)
        if v is None:
            v = default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise ApiError(400, f"`{name}` must be {'an integer' if kind is int else 'a number'}", param=name)
        if not lo <= v <= hi:  # before any float(): an integer too large for a float is just out of range
            raise ApiError(400, f"`{name}`={str(v)[:40]} must be between {lo} and {hi}", param=name)
        if kind is int and isinstance(v, float) and not v.is_integer():
            raise ApiError(400, f"`{name}` must be an integer", param=name)
        return kind(v)

    cap_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    opts = {
        "max_new_tokens": num(cap_name, limits.max_tokens, 1, limits.max_tokens, int),
        "temperature": num("temperature", 0.0, 0.0, 2.0),
        "top_p": num("top_p", 1.0, 1e-6, 1.0),
        "seed": num("seed", 0, 0, 2**32 - 1, int),
    }
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "`stop` must be a string or a list of up to 4 non-empty strings", param="stop")
    opts["stop"] = stop
    if body.get("n") not in (None, 1) or isinstance(body.get("n"), bool):
        raise ApiError(400, "only n=1 is supported", param="n")
    return opts


def check_length(prompt, max_new_tokens: int, limits: Limits, context: int | None) -> None:
    """The rendered conversation against the token limits and the model's context."""
    image_tokens = sum(n for _, n in getattr(prompt, "spans", []))
    if image_tokens > limits.max_image_tokens:
        raise ApiError(400, f"the conversation's images take {image_tokens} image tokens; the limit is "
                       f"{limits.max_image_tokens} (send smaller images)", param="messages", code="images_too_large")
    prompt_tokens = len(prompt.ids)
    if prompt_tokens > limits.max_prompt_tokens:
        raise ApiError(400, f"the conversation is {prompt_tokens} tokens; the limit is {limits.max_prompt_tokens}",
                       param="messages", code="context_length_exceeded")
    if context is not None and prompt_tokens + max_new_tokens > context:
        raise ApiError(400, f"the conversation is {prompt_tokens} tokens and max_tokens asks for {max_new_tokens} "
                       f"more; this model's context holds {context} (shorten the conversation or lower max_tokens)",
                       param="messages", code="context_length_exceeded")


# --------------------------------------------------------------------------- the server


class Engine:
    """The loaded runtime, its single worker thread and the bounded queue in front of it."""

    def __init__(self, runtime, model_name: str, limits: Limits):
        self.rt, self.model_name, self.limits = runtime, model_name, limits
        self.lock = threading.Lock()  # one generation at a time
        self.waiting = 0  # requests admitted (running or queued)
        self.count_lock = threading.Lock()
        self.served = 0
        self.rejected = 0
        self.cancelled = 0

    def admit(self) -> None:
        with self.count_lock:
            if self.waiting >= self.limits.max_queue + 1:
                self.rejected += 1
                raise ApiError(429, f"the server is busy: {self.waiting} requests are running or queued "
                               f"(limit {self.limits.max_queue + 1}); retry later", "rate_limit_error",
                               code="queue_full")
            self.waiting += 1

    def release(self, served: bool = True) -> None:
        with self.count_lock:
            self.waiting -= 1
            self.served += served


def _chunk(cid, created, model, delta, finish=None, **extra) -> str:
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
    return f"data: {json.dumps(body)}\n\n"


def create_app(runtime, model_name: str = "vlsi", api_key: str | None = None, limits: Limits | None = None,
               backend: str | None = None, speculative=None):
    """A Starlette app serving ``runtime`` (anything from :func:`vlsi_runtimes.load`). With
    ``speculative`` (a :class:`vlsi_runtimes.Speculative` or its fields) every answer is decoded
    self-speculatively (greedy: plain greedy decoding's tokens; sampled: plain sampling's
    distribution), checked here before serving; each response's ``vlsi`` block reports the
    drafted and accepted tokens."""
    from vlsi_runtimes import Speculative
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import (
        FileResponse,
        JSONResponse,
        StreamingResponse,
    )
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    limits = limits or Limits()
    speculative = Speculative.of(speculative)
    if speculative is not None:
        runtime._speculation_check(speculative)  # a server that cannot do what it was started for does not start
    engine = Engine(runtime, model_name, limits)
    backend = backend or getattr(runtime, "name", "?")
    started = time.time()

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    class Guard:
        """Body-size bound and bearer token, before a route reads anything."""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
                return await self.app(scope, receive, send)
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            if api_key and headers.get("authorization") != f"Bearer {api_key}":
                return await error(ApiError(401, "missing or wrong API key (send `Authorization: Bearer KEY`)",
                                            "authentication_error", code="invalid_api_key"))(scope, receive, send)
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
                return await error(ApiError(413, f"request body of {length} bytes exceeds the limit of "
                                            f"{limits.max_body_bytes}", code="body_too_large"))(scope, receive, send)
            seen = 0

            async def bounded():
                nonlocal seen
                msg = await receive()
                if msg["type"] == "http.request":
                    seen += len(msg.get("body", b""))
                    if seen > limits.max_body_bytes:
                        raise _TooLarge()
                return msg

            try:
                return await self.app(scope, bounded, send)
            except _TooLarge:
                return await error(ApiError(413, f"request body exceeds the limit of {limits.max_body_bytes} bytes",
                                            code="body_too_large"))(scope, receive, send)

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": model_name, "backend": backend, "queued": engine.waiting,
                             "served": engine.served, "rejected": engine.rejected, "cancelled": engine.cancelled,
                             "uptime_s": round(time.time() - started, 1)})

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [{
            "id": model_name, "object": "model", "created": int(started), "owned_by": "vlsi",
            "backend": backend, "verbalizer_layers": list(runtime.verbalizer_layers)}]})

    async def chat(request: Request):
        try:
            raw = await request.body()
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError) as e:  # also UTF-8 errors, 4300-digit integers, deep nesting
                raise ApiError(400, f"the request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None
            if not isinstance(body, dict):
                raise ApiError(400, "the request body must be a JSON object")
            if "messages" not in body:
                raise ApiError(400, "missing required field `messages`", param="messages")
            if body.get("model") not in (None, model_name):
                raise ApiError(404, f"model {body.get('model')!r} does not exist here; this server has "
                               f"{model_name!r}", param="model", code="model_not_found")
            opts = parse_options(body, limits)
            stream_options = body.get("stream_options")
            if stream_options is not None and not isinstance(stream_options, dict):
                raise ApiError(400, "`stream_options` must be an object", param="stream_options")
            include_usage = bool((stream_options or {}).get("include_usage"))
            if not isinstance(body.get("stream", False), (bool, type(None))):
                raise ApiError(400, "`stream` must be true or false", param="stream")
            want_layers = bool(body.get("verbalize"))
            if want_layers and not runtime.verbalizer_layers:
                raise ApiError(400, "`verbalize` needs an artifact exported with its verbalizers "
                               "(vlsi export --verbalizers)", param="verbalize")
            engine.admit()  # before decoding images: a burst past the bound costs little
        except ApiError as e:
            return error(e)
        try:
            messages = await asyncio.to_thread(parse_messages, body["messages"], limits,
                                               getattr(runtime, "image_spec", None))
            try:
                encoded = await asyncio.to_thread(runtime.encode, messages)
            except VLsIError as e:
                raise ApiError(400, str(e), param=getattr(e, "param", None) or "messages") from None
            check_length(encoded, opts["max_new_tokens"], limits, getattr(runtime, "context_length", None))
        except ApiError as e:
            engine.release(served=False)
            return error(e)
        except BaseException:
            engine.release(served=False)
            raise

        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        gen_holder = {}

        def work():
            """On the worker thread: generate, push pieces to the event loop."""
            try:
                with engine.lock:
                    t0 = time.perf_counter()
                    gen = runtime.generate(None, encoded, opts["max_new_tokens"], opts["temperature"], opts["top_p"],
                                           opts["stop"], stream=True, seed=opts["seed"], speculative=speculative)
                    gen_holder["gen"] = gen
                    if gen_holder.get("cancel"):
                        gen.cancel()
                    first = None
                    for piece in gen:
                        if first is None:
                            first = time.perf_counter() - t0
                        loop.call_soon_threadsafe(queue.put_nowait, ("piece", piece))
                    timing = {"ttft_s": first, "seconds": time.perf_counter() - t0}
                    if gen.finish_reason == "cancelled":
                        engine.cancelled += 1
                    layers = None
                    if want_layers and gen.finish_reason != "cancelled":
                        layers = {f"layer_{k}": text for k, text in
                                  runtime.verbalize(None, encoded, limits.verbalize_tokens, final=False).items()}
                loop.call_soon_threadsafe(queue.put_nowait, ("done", (gen, timing, layers)))
            except Exception as e:  # noqa: BLE001 - reported to the client as a 500
                loop.call_soon_threadsafe(queue.put_nowait, ("error", e))
            finally:
                engine.release()

        def cancel():
            gen_holder["cancel"] = True
            if "gen" in gen_holder:
                gen_holder["gen"].cancel()

        threading.Thread(target=work, daemon=True).start()

        def usage(gen):
            return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
                    "total_tokens": gen.prompt_tokens + gen.completion_tokens,
                    "prompt_tokens_details": {"cached_tokens": gen.cached_tokens}}

        def extras(gen, timing, layers):
            decode_s = timing["seconds"] - (timing["ttft_s"] or 0.0)
            rate = (gen.completion_tokens - 1) / decode_s if gen.completion_tokens > 1 and decode_s > 0 else None
            out = {"usage": usage(gen), "vlsi": {"backend": backend, **timing, "tokens_per_s": rate}}
            if speculative is not None:
                st = gen.stats
                cycles = st.get("cycles", 0)
                out["vlsi"]["speculative"] = {
                    "layer": speculative.layer, "tokens": speculative.tokens, "cycles": cycles,
                    "drafted": st.get("drafted", 0), "accepted": st.get("accepted", 0),
                    "accepted_per_cycle": st.get("accepted", 0) / cycles if cycles else None}
            if layers is not None:
                out["verbalizations"] = layers
            return out

        if not body.get("stream"):
            text = []
            try:
                while True:
                    get = asyncio.ensure_future(queue.get())
                    while not get.done():
                        await asyncio.wait({get}, timeout=0.25)
                        if not get.done() and await request.is_disconnected():
                            cancel()
                    kind, val = get.result()
                    if kind == "piece":
                        text.append(val)
                    elif kind == "error":
                        return error(ApiError(500, f"generation failed: {type(val).__name__}: {val}", "server_error"))
                    else:
                        gen, timing, layers = val
                        break
            except asyncio.CancelledError:
                cancel()
                raise
            return JSONResponse({
                "id": cid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                             "finish_reason": gen.finish_reason if gen.finish_reason != "cancelled" else "stop"}],
                **extras(gen, timing, layers)})

        async def events():
            try:
                yield _chunk(cid, created, model_name, {"role": "assistant", "content": ""})
                while True:
                    kind, val = await queue.get()
                    if kind == "piece":
                        yield _chunk(cid, created, model_name, {"content": val})
                    elif kind == "error":
                        yield f"data: {json.dumps(ApiError(500, str(val), 'server_error').body())}\n\n"
                        break
                    else:
                        gen, timing, layers = val
                        yield _chunk(cid, created, model_name, {}, gen.finish_reason, **extras(gen, timing, layers))
                        if include_usage:  # OpenAI's last chunk: no choices, the whole request's usage
                            body_ = {"id": cid, "object": "chat.completion.chunk", "created": created,
                                     "model": model_name, "choices": [], "usage": usage(gen)}
                            yield f"data: {json.dumps(body_)}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or we finished): stop generating
                cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def index(request: Request):
        return FileResponse(STATIC / "index.html")

    async def not_found(request: Request, exc):
        status = getattr(exc, "status_code", 404)
        return JSONResponse(ApiError(status, f"{request.method} {request.url.path}: "
                                     f"{getattr(exc, 'detail', 'not found')}", code="not_found").body(),
                            status_code=status)

    routes = [
        Route("/", index),
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(Guard)], exception_handlers={404: not_found, 405: not_found})
    app.state.engine = engine
    return app


class _TooLarge(Exception):
    pass


def serve(model, backend: str = "auto", host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          name: str | None = None, limits: Limits | None = None, providers: str | None = None,
          speculative=None) -> None:
    """Load ``model`` once and serve it until interrupted (``providers``: ONNX Runtime's execution
    providers for an ONNX artifact, e.g. ``"tensorrt,cuda,cpu"``; ``speculative``: see :func:`create_app`)."""
    import uvicorn
    from vlsi_runtimes import load

    rt = load(model, backend=backend, **({"providers": providers} if providers else {}))
    app = create_app(rt, name or Path(model).resolve().name, api_key=api_key, limits=limits, backend=rt.name,
                     speculative=speculative)
    print(f"vlsi serve: {Path(model)} on the {rt.name} backend at http://{host}:{port}/", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
