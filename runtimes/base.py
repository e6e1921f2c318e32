"""The runtime interface every backend implements, and the decoding logic they share.

Every method that takes a prompt takes either a list of chat messages (``rt.generate(messages)``:
system, user and assistant turns, images in any user turn, rendered with the architecture's chat
layout, see :func:`vlsi.chat.conversation`) or the one-turn shortcut ``(images, prompt)``.

A backend provides ``_encode(turns, images) -> Prompt``, two operations on numpy arrays,
``_prefill(prompt) -> (state, logits)`` and ``_step(state, token) -> logits`` (``logits`` maps
``"final"``, the model's head, and each kept verbalizer layer to a ``(V,)`` array for the next
token), and the public ``decode(ids)`` and ``image_embeds(images)``. Everything else —
sampling, stop strings, streaming, per-layer verbalization, prefix reuse — is written once here.

**Prefix reuse.** A runtime keeps the KV cache of the sequence it last decoded (one entry: the
prompt and the tokens fed after it). When the next prompt starts with the same tokens — the same
images included, compared by content — only the rest is prefilled: a follow-up question about an
image already seen costs its own tokens, not the image again. A backend opts in with
``_resume(state, n, prompt) -> (state, logits)`` (keep the first ``n`` positions of ``state``,
prefill the rest of ``prompt``); the entry is dropped on any mismatch or error, and
``reuse=False`` (or ``rt.reuse = False``) turns it off.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from vlsi.chat import conversation, is_messages, one_turn
from vlsi.data.records import Turn
from vlsi.errors import ConfigError

FINAL = "final"


class LayerLogits(Mapping):
    """Next-token logits by source, as ``_step`` returns them: ``"final"`` (the model's head),
    computed, and each kept verbalizer layer, computed from its captured hidden state when first
    read and then kept. Plain decoding reads ``"final"`` only, so no head runs; ``verbalize`` and
    ``logits`` read the layers they need. Keys and ``in`` never compute anything."""

    def __init__(self, final: np.ndarray, layers, compute):
        self._values = {FINAL: final}
        self._layers = tuple(layers)
        self._compute = compute

    def __getitem__(self, key):
        if key not in self._values:
            if key not in self._layers:
                raise KeyError(key)
            self._values[key] = self._compute(key)
        return self._values[key]

    def __contains__(self, key) -> bool:
        return key == FINAL or key in self._layers

    def __iter__(self):
        return iter((FINAL, *self._layers))

    def __len__(self) -> int:
        return 1 + len(self._layers)


@dataclass
class Prompt:
    """A tokenised prompt with its images already preprocessed by the backend's own code."""

    ids: list[int]
    images: object  # backend-specific (pixel arrays and grids)
    spans: list[tuple[int, int]] = field(default_factory=list)
    """``(first position, tokens)`` of each image in ``ids``, in order."""
    digests: list[str] = field(default_factory=list)
    """A content hash of each image (prefix reuse compares images by it)."""
    sources: list = field(default_factory=list)
    """The checked images themselves, for backends that encode only the images a reused prefix lacks."""

    def keys(self) -> list:
        """One comparable key per position: the token id, or ``(image digest, its tokens, index)`` inside an image."""
        keys: list = list(self.ids)
        for (start, count), digest in zip(self.spans, self.digests):  # the count too: some architectures
            keys[start:start + count] = [(digest, count, k) for k in range(count)]  # tile an image by context
        return keys


def image_digest(image) -> str:
    """A hash of a decoded (PIL) image's pixels and size."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def image_spans(ids, image_token_id: int, counts: list[int]) -> list[tuple[int, int]]:
    """``(start, tokens)`` of each image in expanded ``ids`` whose ``k``-th image takes ``counts[k]``
    image tokens (adjacent images are told apart by their counts, not by runs)."""
    where = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(where) != sum(counts):
        raise ConfigError(f"{len(where)} image tokens in the prompt for {sum(counts)} image features")
    spans, at = [], 0
    for count in counts:
        spans.append((where[at], count) if count else (where[at] if at < len(where) else len(ids), 0))
        at += count
    return spans


def shared_prefix(cached: list, prompt: Prompt) -> int:
    """How many leading positions of ``prompt`` the cached keys hold, never cutting an image
    and always leaving at least one position to prefill (its logits start the answer)."""
    keys = prompt.keys()
    n, limit = 0, min(len(cached), len(keys) - 1)
    while n < limit and cached[n] == keys[n]:
        n += 1
    for start, count in prompt.spans:
        if start < n < start + count:
            n = start
    return max(n, 0)


@dataclass(frozen=True)
class Speculative:
    """Self-speculative decoding: draft with the layers up to ``layer`` and that layer's
    verbalizer head, ``tokens`` at most per cycle (stopping early when the head's top
    probability falls below ``min_p``), verify every drafted token in one pass of the layers
    above, keep the longest prefix the model's own head agrees with and its next token, roll
    the rest of the KV cache back. Greedy output is the same as plain decoding's, token for
    token, on artifacts whose passes are batch-invariant (see each backend); sampled output is
    distributed as plain sampling's (speculative sampling's acceptance rule).

    ``drafter``: ``"verbalizer"`` (the layer's verbalizer head, the default) or ``"model"`` (the
    llama.cpp backend's draft model with its own final norm and output matrix, i.e. the logit
    lens at ``layer``: what llama.cpp's own draft-model speculation does with that file)."""

    layer: int
    tokens: int = 4
    min_p: float = 0.0
    drafter: str = "verbalizer"

    DRAFTERS = ("verbalizer", "model")

    def __post_init__(self):
        if self.drafter not in self.DRAFTERS:
            raise ConfigError(f"speculative drafter={self.drafter!r}: one of {', '.join(self.DRAFTERS)}")
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
            raise ConfigError(f"speculative tokens={self.tokens!r}: draft at least 1 token per cycle")
        if not 0.0 <= self.min_p < 1.0:
            raise ConfigError(f"speculative min_p={self.min_p!r} must be in [0, 1)")

    @classmethod
    def of(cls, value) -> Speculative | None:
        """``None``, a :class:`Speculative`, or a mapping of its fields (``{"layer": 2, "tokens": 3}``)."""
        if value is None or isinstance(value, Speculative):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {"layer", "tokens", "min_p", "drafter"}
            if unknown or "layer" not in value:
                raise ConfigError(f"speculative takes layer, tokens, min_p and drafter; got {sorted(value)}")
            return cls(**value)
        raise ConfigError(f"speculative must be a Speculative or a mapping, not {type(value).__name__}")


@dataclass
class _Entry:
    """The reusable KV state of the last decoded sequence and one key per position it holds."""

    keys: list
    state: object


class Runtime:
    """Load with :func:`vlsi_runtimes.load`; then ``generate``, ``verbalize``, ``logits``."""

    name = "base"
    verbalizer_layers: tuple[int, ...] = ()
    max_new_tokens_cap = 4096
    reuse = True
    """Keep the last sequence's KV cache and prefill only what a new prompt adds to it."""
    capture_layers = True
    """Whether a forward pass keeps what the verbalizers' logits are computed from. Decoding
    from the model's head turns it off for its own passes only, so that a backend for which
    keeping it costs something (llama.cpp's eval callback) pays nothing; reading a layer's
    logits from a pass made without it is an error."""
    context_length: int | None = None
    """Positions the model's cache holds in all (prompt and answer), when the backend is bounded."""
    _entry: _Entry | None = None

    # backends implement these
    def _encode(self, turns: tuple[Turn, ...], images: list) -> Prompt:
        """Render ``turns`` (``<image>`` placeholders, ``images`` in order) and preprocess the images."""
        raise NotImplementedError

    def _resume(self, state, n: int, prompt: Prompt):
        """Keep the first ``n`` positions of ``state`` and prefill ``prompt.ids[n:]``; -> ``(state, logits)``.
        Backends without it raise NotImplementedError (and always prefill everything)."""
        raise NotImplementedError

    def _prefill(self, prompt: Prompt):
        raise NotImplementedError

    def _step(self, state, token: int) -> dict:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text, special tokens dropped."""
        raise NotImplementedError

    def image_embeds(self, images) -> np.ndarray:
        """What the vision part makes of ``images``: ``(image tokens, hidden)``, images in order
        (parity checks compare this across backends)."""
        raise NotImplementedError

    eos_ids: tuple[int, ...] = ()

    # ------------------------------------------------------------------ shared
    @staticmethod
    def user_turns(images: list, prompt: str) -> tuple[Turn, ...]:
        """One user turn: images first (unless the prompt places ``<image>`` itself), then text."""
        return one_turn(images, prompt)

    def _pick(self, logits: np.ndarray, temperature: float, top_p: float, rng) -> int:
        if temperature <= 0:
            return int(np.argmax(logits))
        return int(rng.choice(len(logits), p=sampling_probs(logits, temperature, top_p)))

    def _check(self, max_new_tokens, temperature, top_p):
        if not 1 <= max_new_tokens <= self.max_new_tokens_cap:
            raise ConfigError(f"max_new_tokens={max_new_tokens} must be between 1 and {self.max_new_tokens_cap}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ConfigError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")

    def encode(self, images, prompt=None) -> Prompt:
        """A prompt as this backend's :class:`Prompt` (images checked and preprocessed here):
        ``encode(messages)`` for a list of chat messages, ``encode(images, text)`` for one user
        turn, or a :class:`Prompt` back unchanged."""
        if isinstance(prompt, Prompt):
            return prompt
        if isinstance(images, Prompt) and prompt is None:
            return images
        if is_messages(images) or is_messages(prompt):
            if is_messages(images) and prompt is not None:
                raise ConfigError("pass either a list of messages or (images, prompt), not both")
            if is_messages(prompt) and images:
                raise ConfigError("with a list of messages, images go inside the user messages")
            turns, refs = conversation(images if prompt is None else prompt)
            return self._encode(turns, refs)
        if not isinstance(prompt, str):
            raise ConfigError(f"the prompt must be text, a list of chat messages or a Prompt, not {type(prompt).__name__}")
        images = list(images or [])
        return self._encode(one_turn(images, prompt), images)

    # ------------------------------------------------------------------ prefill with reuse
    def _start(self, prompt: Prompt, reuse: bool | None = None):
        """Prefill ``prompt``, reusing the cached sequence's shared prefix when there is one;
        -> ``(state, logits, reused positions)``. The cache entry is taken (one sequence owns it)."""
        entry, self._entry = self._entry, None
        if entry is not None and (self.reuse if reuse is None else reuse):
            n = shared_prefix(entry.keys, prompt)
            if n > 0:
                try:
                    state, logits = self._resume(entry.state, n, prompt)
                    return state, logits, n
                except NotImplementedError:
                    pass
        del entry  # its memory goes before the new prefill allocates
        state, logits = self._prefill(prompt)
        return state, logits, 0

    def _keep(self, state, keys: list) -> None:
        """Offer ``state`` (holding one position per key) for the next prompt to reuse."""
        self._entry = _Entry(keys, state) if self.reuse else None

    def forget(self) -> None:
        """Drop the cached sequence (its KV cache memory is freed)."""
        self._entry = None

    def stream_tokens(self, images, prompt=None, max_new_tokens: int = 64, temperature: float = 0.0,
                      top_p: float = 1.0, source: str | int = FINAL, seed: int = 0,
                      ignore_eos: bool = False, reuse: bool | None = None, stats: dict | None = None,
                      speculative=None) -> Iterator[int]:
        """Yield new token ids, read from the model's head or a verbalizer layer's
        (``ignore_eos`` decodes exactly ``max_new_tokens``, for benchmarks). The prompt is a
        list of messages, ``(images, text)`` or a :class:`Prompt` from :meth:`encode`.
        ``stats``, when given, receives ``prompt_tokens`` and ``cached_tokens`` (the prompt
        positions reused from the last sequence), and with ``speculative`` (a
        :class:`Speculative` or its fields as a mapping) ``cycles``, ``drafted`` and ``accepted``."""
        self._check(max_new_tokens, temperature, top_p)
        if source != FINAL and source not in self.verbalizer_layers:
            raise ConfigError(f"layer {source} has no verbalizer here; kept: {list(self.verbalizer_layers)}")
        spec = Speculative.of(speculative)
        if spec is not None:
            if source != FINAL:
                raise ConfigError("speculative decoding decodes from the model's own head: source='final'")
            self._speculation_check(spec)
        rng = np.random.default_rng(seed)
        encoded = self.encode(images, prompt)
        layers = source != FINAL
        self.capture_layers = layers
        try:
            state, logits, cached = self._start(encoded, reuse)
        finally:
            self.capture_layers = True
        if stats is not None:
            stats.update(prompt_tokens=len(encoded.ids), cached_tokens=cached)
        keys = encoded.keys()
        if spec is not None:
            stats = stats if stats is not None else {}
            stats.update(cycles=0, drafted=0, accepted=0)
            yield from self._speculate(state, logits, keys, spec, max_new_tokens, ignore_eos, stats,
                                       temperature, top_p, rng)
            return
        try:
            for i in range(max_new_tokens):
                tok = self._pick(logits[source], temperature, top_p, rng)
                if tok in self.eos_ids and not ignore_eos:
                    break
                yield tok
                if i + 1 < max_new_tokens:  # the last token needs no forward pass after it
                    self.capture_layers = layers
                    try:
                        logits = self._step(state, tok)
                    finally:
                        self.capture_layers = True
                    keys.append(tok)
        except GeneratorExit:  # the consumer stopped early (a stop string, a closed stream): the state is whole
            raise
        except BaseException:
            state = None  # a step that failed half-way leaves the state unknown
            raise
        finally:
            if state is not None:  # also when the consumer stops early: every fed token is in the state
                self._keep(state, keys)

    # ------------------------------------------------------------------ self-speculative decoding
    def _speculation_check(self, spec: Speculative) -> None:
        """Refuse ``spec`` where this runtime cannot draft that way, or not exactly; else make
        the runtime ready to draft that way (the drafting layer's graphs)."""
        raise ConfigError(f"the {self.name} backend does not decode speculatively")

    def _draft_feed(self, state, token: int):
        """Feed ``token`` through the drafting layers only (their cache grows by one); -> what
        the drafting layer's head and the verifying layers read (backend-specific)."""
        raise NotImplementedError

    def _draft_logits(self, drafted) -> np.ndarray:
        """The drafting head's ``(V,)`` logits for what :meth:`_draft_feed` returned."""
        raise NotImplementedError

    def _verify(self, state, drafted: list) -> np.ndarray:
        """One pass of the layers above the drafting layer over every position fed since the
        last verification; -> the model's ``(n, V)`` logits, one row per position."""
        raise NotImplementedError

    def _rollback(self, state, n: int) -> None:
        """Keep the first ``n`` positions of every layer's cache."""
        raise NotImplementedError

    def _speculate(self, state, logits, keys: list, spec: Speculative, max_new_tokens: int, ignore_eos: bool,
                   stats: dict, temperature: float = 0.0, top_p: float = 1.0, rng=None) -> Iterator[int]:
        """Decoding in draft-and-verify cycles. A cycle starts from the next token (known, not
        yet fed), drafts up to ``spec.tokens`` more with the drafting layers and head, verifies
        them all in one pass, and yields the drafts the model accepts and the model's own token
        after them, which starts the next cycle. Greedy: a draft is accepted when it is the
        model's argmax, so the tokens are plain greedy decoding's. Sampling: drafts are drawn
        from the head's distribution and accepted by speculative sampling's rule
        (:func:`accept_draft`), so the tokens are distributed as plain sampling's."""
        greedy = temperature <= 0
        rng = rng if rng is not None else np.random.default_rng(0)

        def draw(lg):
            """A token from ``lg`` as this decoding draws (and the distribution, when sampling)."""
            if greedy:
                return int(np.argmax(lg)), None
            p = sampling_probs(lg, temperature, top_p)
            return int(rng.choice(len(p), p=p)), p

        tok = draw(logits[FINAL])[0]
        emitted = 0
        try:
            while True:
                if tok in self.eos_ids and not ignore_eos:
                    return
                yield tok
                emitted += 1
                room = max_new_tokens - emitted  # tokens still to yield
                if room <= 0:
                    return
                start = self._fed(state)
                drafts: list[int] = []
                dists: list = []
                fed = [self._draft_feed(state, tok)]
                while len(drafts) < min(spec.tokens, room - 1):
                    head = self._draft_logits(fed[-1])
                    d, q = draw(head)
                    drafts.append(d)
                    dists.append(q)
                    if d in self.eos_ids and not ignore_eos:
                        break  # nothing after an end of sequence is worth drafting
                    fed.append(self._draft_feed(state, d))
                    if spec.min_p > 0 and _top_probability(head) < spec.min_p:
                        break
                rows = self._verify(state, fed)  # row j: the model's next-token logits after fed[j]
                m, nxt = 0, None
                for d, q, row in zip(drafts, dists, rows):
                    if greedy:
                        best = int(np.argmax(row))
                        replaced = None if d == best else best
                    else:
                        replaced = accept_draft(sampling_probs(row, temperature, top_p), q, d, rng)
                    if replaced is not None:
                        nxt = replaced
                        break
                    m += 1
                if nxt is None and m < len(fed):  # every draft accepted: the row after the last one gives the next
                    nxt = draw(rows[m])[0]
                stats["cycles"] += 1
                stats["drafted"] += len(drafts)
                stats["accepted"] += m
                kept = min(m + 1, len(fed))  # the cycle's first token and the accepted drafts, fed
                self._rollback(state, start + kept)
                keys += [tok, *drafts[:kept - 1]]
                for d in drafts[:m]:
                    if d in self.eos_ids and not ignore_eos:
                        return
                    yield d
                    emitted += 1
                    if emitted >= max_new_tokens:
                        return
                if nxt is None:  # every draft accepted and the last one (an end of sequence) was not fed
                    return
                tok = nxt
        except GeneratorExit:
            raise
        except BaseException:
            state = None
            raise
        finally:
            if state is not None:
                self._keep(state, keys)

    def _fed(self, state) -> int:
        """Positions every layer's cache holds."""
        raise NotImplementedError

    def generate(self, images, prompt=None, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, stop: list[str] | None = None, stream: bool = False, seed: int = 0,
                 reuse: bool | None = None, speculative=None):
        """The answer as text, or with ``stream=True`` a :class:`Generation`: an iterator of
        text pieces that also counts tokens (``prompt_tokens``, ``cached_tokens``,
        ``completion_tokens``; with ``speculative``, ``cycles``, ``drafted``, ``accepted``) and
        says why it finished. The prompt is a list of chat messages (``generate(messages)``),
        ``(images, text)`` or a :class:`Prompt` from :meth:`encode`.

        Greedy when ``temperature == 0``. Text is cut before the first ``stop`` string.
        ``speculative`` (a :class:`Speculative` or ``{"layer": k, "tokens": n, "min_p": p}``)
        drafts with layer ``k``'s verbalizer and verifies with the model: greedy, the same
        tokens; sampling, tokens distributed as plain sampling's (not the same draws)."""
        self._check(max_new_tokens, temperature, top_p)  # now, not at the first piece of a stream
        spec = Speculative.of(speculative)
        if spec is not None:
            self._speculation_check(spec)
        encoded = self.encode(images, prompt)
        gen = Generation(self, encoded, max_new_tokens, temperature, top_p, stop or [], seed, reuse, spec)
        return gen if stream else "".join(gen)

    def verbalize(self, images, prompt=None, max_new_tokens: int = 32, final: bool = True) -> dict:
        """What each layer would answer: greedy decoding from every kept verbalizer, shallow to
        deep, then (with ``final``) the model's own head (the paper's Figure 3)."""
        encoded = self.encode(images, prompt)
        layers = (*self.verbalizer_layers, FINAL) if final else self.verbalizer_layers
        return {layer: self.decode(list(self.stream_tokens(encoded, None, max_new_tokens, source=layer)))
                for layer in layers}

    def logits(self, images, prompt=None, continuation: list[int] | None = None) -> list[dict]:
        """Next-token logits after the prompt and after each token of ``continuation``:
        a list of ``{"final": (V,), layer: (V,), ...}`` (used for parity checks; no reuse)."""
        self.forget()
        state, lg = self._prefill(self.encode(images, prompt))
        out = [lg]
        for tok in continuation or []:
            out.append(self._step(state, tok))
        return out


def sampling_probs(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """The distribution sampling draws from: softmax at ``temperature`` (> 0), cut to the
    smallest set of tokens whose probability reaches ``top_p``, renormalised."""
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        z = (logits.astype(np.float64) - float(np.max(logits))) / temperature  # <= 0: no overflow at tiny T
        p = np.exp(z)
    p = np.where(np.isfinite(p), p, 0.0)
    if not p.sum() > 0:
        p = np.zeros(len(logits))
        p[int(np.argmax(logits))] = 1.0
        return p
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        keep = np.cumsum(p[order]) - p[order] < top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return p


def accept_draft(p: np.ndarray, q: np.ndarray, draft: int, rng) -> int | None:
    """Speculative sampling's rule for one drafted token: keep ``draft`` (drawn from the
    drafter's ``q``) with probability ``min(1, p[draft] / q[draft])`` (-> None), else draw the
    replacement from ``max(0, p - q)`` renormalised (-> its id). The token that comes out is
    distributed as ``p``, the model's own distribution, whatever ``q`` is."""
    if q[draft] > 0 and rng.random() < min(1.0, p[draft] / q[draft]):
        return None
    rest = np.maximum(p - q, 0.0)
    total = rest.sum()
    return int(rng.choice(len(p), p=rest / total if total > 0 else p))


def _top_probability(logits: np.ndarray) -> float:
    z = logits.astype(np.float64) - float(np.max(logits))
    return float(1.0 / np.exp(z).sum())


class SpecRuntime(Runtime):
    """A backend whose prompts and images are prepared on the host by the architecture's
    torch-free spec (ONNX Runtime, TensorRT): the chat layout, image checks, preprocessing,
    image-token expansion and prefill (with prefix reuse) are written once here. Subclasses set
    ``tok``, ``spec``, ``image_spec``, ``model`` (the manifest's model block) and
    ``image_token_id``, and provide the graph calls: :meth:`_vision`, :meth:`_embed_tokens`,
    :meth:`_new_state`, :meth:`_forward` and, for reuse, :meth:`_truncate`."""

    def _vision(self, vision) -> np.ndarray:
        raise NotImplementedError

    def _embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        """``(1, L)`` token ids -> ``(1, L, hidden)`` embeddings (a writable array)."""
        raise NotImplementedError

    def _new_state(self) -> dict:
        """An empty sequence: ``{"length": 0, ...}`` with the backend's KV cache."""
        raise NotImplementedError

    def _forward(self, state: dict, embeds: np.ndarray, positions: np.ndarray) -> dict:
        """Run the decoder on new positions, advancing ``state``; -> the last position's logits."""
        raise NotImplementedError

    def _truncate(self, state: dict, n: int) -> None:
        """Keep the first ``n`` positions of ``state``'s KV cache (NotImplementedError: no reuse)."""
        raise NotImplementedError

    def _encode(self, turns, images):
        from vlsi.chat import chat_ids, expand_images
        from vlsi.images import load_image

        pil = [load_image(im, self.image_spec) for im in images]
        ids, _ = chat_ids(self.tok, turns, self.spec.image_marker, for_generation=True)
        vision, spans = None, []
        if pil:
            vision = self.spec.prepare_images(pil, self.image_spec, self.model)
            try:
                ids, _ = expand_images(ids, [0] * len(ids), self.image_token_id, vision.tokens)
            except ValueError as e:  # image marker tokens typed into the text
                raise ConfigError(f"{e}: the text itself holds the image marker; send images as image parts") from None
            spans = image_spans(ids, self.image_token_id, vision.tokens)
        elif self.image_token_id in ids:
            raise ConfigError("the text holds image tokens but no image was given")
        return Prompt(ids, vision, spans, [image_digest(im) for im in pil], pil)

    def _prefill(self, prompt: Prompt):
        return self._fill(prompt, self._new_state(), 0)

    def _resume(self, state, n, prompt):
        self._truncate(state, n)
        state["length"] = n
        return self._fill(prompt, state, n)

    def _fill(self, prompt: Prompt, state: dict, start: int):
        """Prefill ``prompt.ids[start:]`` after the ``start`` positions ``state`` holds; only the
        images that lie there are encoded. ``state["tops"]`` keeps the running largest position
        of the prompt fed (decoded tokens go on by one from its last), so that a follow-up of
        text only takes its positions from there (:meth:`~vlsi.archs.spec.ArchSpec.text_positions`)
        instead of computing the whole prompt's."""
        ids = np.asarray([prompt.ids], dtype=np.int64)
        new = [k for k, (first, _) in enumerate(prompt.spans) if first >= start]
        if start and not new:
            kept = self._tops(state, start)
            pos = self.spec.text_positions(int(kept[-1]) + 1, ids.shape[1] - start)
            tops = np.concatenate([kept, pos[0, 0]])
        else:
            whole = self.spec.positions(ids, prompt.images, self.model)
            pos = whole[..., start:]  # the whole prompt's, then the new part
            tops = np.maximum.accumulate(whole.max(axis=0)[0])
        embeds = self._embed_tokens(ids[:, start:])
        if new:
            embeds[0, ids[0, start:] == self.image_token_id] = self._new_image_features(prompt, new)
        state["tops"] = tops
        state["next_pos"] = int(tops[-1]) + 1
        return state, self._forward(state, embeds, pos)

    @staticmethod
    def _tops(state: dict, n: int) -> np.ndarray:
        """The running largest position over the first ``n`` positions ``state`` holds: its
        prompt's, then one more per decoded token."""
        tops = state["tops"]
        if n <= len(tops):
            return tops[:n]
        return np.concatenate([tops, tops[-1] + np.arange(1, n - len(tops) + 1)])

    def _new_image_features(self, prompt: Prompt, new: list[int]) -> np.ndarray:
        """The vision features of images ``new`` (indices into the prompt's images), in order:
        those images alone when they encode as in the whole prompt, else all of them, sliced
        (LLaVA-OneVision tiles an image differently alone than among several)."""
        if len(new) < len(prompt.spans):
            alone = self.spec.prepare_images([prompt.sources[k] for k in new], self.image_spec, self.model)
            if list(alone.tokens) == [prompt.spans[k][1] for k in new]:
                return self._vision(alone)
        feats = self._vision(prompt.images)
        if len(new) == len(prompt.spans):
            return feats
        bounds = np.cumsum([0, *(count for _, count in prompt.spans)])
        return np.concatenate([feats[bounds[k]:bounds[k + 1]] for k in new])

    def _step(self, state, token):
        emb = self._embed_tokens(np.array([[token]], np.int64))
        pos = np.full((self.spec.position_axes, 1, 1), state["next_pos"], np.int64)
        state["next_pos"] += 1
        return self._forward(state, emb, pos)

    def image_embeds(self, images) -> np.ndarray:
        from vlsi.images import load_image

        pil = [load_image(im, self.image_spec) for im in images]
        return np.asarray(self._vision(self.spec.prepare_images(pil, self.image_spec, self.model)), np.float32)

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)


class Generation:
    """Text pieces as they are decoded; afterwards ``prompt_tokens``, ``completion_tokens``,
    ``text`` and ``finish_reason`` (``"stop"``: end of sequence or a stop string,
    ``"length"``: ``max_new_tokens`` reached, ``"cancelled"``: :meth:`cancel` was called).
    ``cancel()`` may be called from another thread; decoding stops before the next token."""

    def __init__(self, runtime: Runtime, prompt: Prompt, max_new_tokens, temperature, top_p, stop, seed,
                 reuse: bool | None = None, speculative: Speculative | None = None):
        self.prompt_tokens = len(prompt.ids)
        self.speculative = speculative
        self.stats: dict = {}
        """``prompt_tokens``, ``cached_tokens``; with speculation ``cycles``, ``drafted``, ``accepted``."""
        self.cached_tokens = 0
        """Prompt positions reused from the runtime's last sequence (known once decoding started)."""
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.text = ""
        self._cancelled = False
        self._reuse = reuse
        self._pieces = self._run(runtime, prompt, max_new_tokens, temperature, top_p, stop, seed)

    def cancel(self) -> None:
        self._cancelled = True

    def __iter__(self):
        return self._pieces

    def __next__(self):
        return next(self._pieces)

    def _run(self, rt, prompt, max_new_tokens, temperature, top_p, stop, seed) -> Iterator[str]:
        ids: list[int] = []
        hold = max((len(s) - 1 for s in stop), default=0)
        self.finish_reason = "stop"
        stats = self.stats
        tokens = rt.stream_tokens(prompt, None, max_new_tokens, temperature, top_p, FINAL, seed,
                                  reuse=self._reuse, stats=stats, speculative=self.speculative)
        try:
            for tok in tokens:
                self.cached_tokens = stats.get("cached_tokens", 0)
                if self._cancelled:
                    self.finish_reason = "cancelled"
                    return
                ids.append(tok)
                self.completion_tokens = len(ids)
                text = rt.decode(ids)
                if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next byte
                    continue
                cut = min((text.find(s) for s in stop if s in text), default=-1)
                if cut >= 0:
                    if cut > len(self.text):
                        yield self._emit(text[:cut])
                    return
                # hold back a tail that could still become a stop string
                ready = text[: max(len(self.text), len(text) - hold)]
                if len(ready) > len(self.text):
                    yield self._emit(ready)
        finally:
            tokens.close()  # now, not when collected: the runtime keeps what it fed for the next prompt
            self.cached_tokens = stats.get("cached_tokens", 0)
        if len(ids) >= max_new_tokens:
            self.finish_reason = "length"
        text = rt.decode(ids)
        if len(text) > len(self.text):
            yield self._emit(text)

    def _emit(self, text: str) -> str:
        piece, self.text = text[len(self.text):], text
        return piece
