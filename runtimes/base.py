"""The runtime interface every backend implements, and the decoding logic they share.

A backend provides ``_encode(images, text) -> Prompt``, two operations on numpy arrays,
``_prefill(prompt) -> (state, logits)`` and ``_step(state, token) -> logits`` (``logits`` maps
``"final"``, the model's head, and each kept verbalizer layer to a ``(V,)`` array for the next
token), and the public ``decode(ids)`` and ``image_embeds(images)``. Everything else —
sampling, stop strings, streaming, per-layer verbalization — is written once here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from vlsi.data.records import IMAGE_PLACEHOLDER, Turn
from vlsi.errors import ConfigError

FINAL = "final"


@dataclass
class Prompt:
    """A tokenised prompt with its images already preprocessed by the backend's own code."""

    ids: list[int]
    images: object  # backend-specific (pixel arrays and grids)


class Runtime:
    """Load with :func:`vlsi_runtimes.load`; then ``generate``, ``verbalize``, ``logits``."""

    name = "base"
    verbalizer_layers: tuple[int, ...] = ()
    max_new_tokens_cap = 4096

    # backends implement these
    def _encode(self, images: list, text: str) -> Prompt:
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
        n = prompt.count(IMAGE_PLACEHOLDER)
        if n == 0:
            prompt = f"{IMAGE_PLACEHOLDER}\n" * len(images) + prompt
        elif n != len(images):
            raise ConfigError(f"the prompt has {n} <image> placeholders for {len(images)} images")
        return (Turn("user", prompt),)

    def _pick(self, logits: np.ndarray, temperature: float, top_p: float, rng) -> int:
        if temperature <= 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        if top_p < 1.0:
            order = np.argsort(-p)
            keep = np.cumsum(p[order]) - p[order] < top_p
            mask = np.zeros_like(p, dtype=bool)
            mask[order[keep]] = True
            p = np.where(mask, p, 0.0)
            p /= p.sum()
        return int(rng.choice(len(p), p=p))

    def _check(self, max_new_tokens, temperature, top_p):
        if not 1 <= max_new_tokens <= self.max_new_tokens_cap:
            raise ConfigError(f"max_new_tokens={max_new_tokens} must be between 1 and {self.max_new_tokens_cap}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ConfigError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")

    def encode(self, images, prompt: str) -> Prompt:
        """Tokenise ``prompt`` with its images (checked and preprocessed by this backend)."""
        return self._encode(list(images), prompt)

    def stream_tokens(self, images, prompt: str | Prompt, max_new_tokens: int = 64, temperature: float = 0.0,
                      top_p: float = 1.0, source: str | int = FINAL, seed: int = 0,
                      ignore_eos: bool = False) -> Iterator[int]:
        """Yield new token ids, read from the model's head or a verbalizer layer's
        (``ignore_eos`` decodes exactly ``max_new_tokens``, for benchmarks). ``prompt`` may be
        text (encoded with ``images``) or a :class:`Prompt` from :meth:`encode`."""
        self._check(max_new_tokens, temperature, top_p)
        if source != FINAL and source not in self.verbalizer_layers:
            raise ConfigError(f"layer {source} has no verbalizer here; kept: {list(self.verbalizer_layers)}")
        rng = np.random.default_rng(seed)
        encoded = prompt if isinstance(prompt, Prompt) else self.encode(images, prompt)
        state, logits = self._prefill(encoded)
        for i in range(max_new_tokens):
            tok = self._pick(logits[source], temperature, top_p, rng)
            if tok in self.eos_ids and not ignore_eos:
                return
            yield tok
            if i + 1 < max_new_tokens:  # the last token needs no forward pass after it
                logits = self._step(state, tok)

    def generate(self, images, prompt: str | Prompt, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, stop: list[str] | None = None, stream: bool = False, seed: int = 0):
        """The answer as text, or with ``stream=True`` a :class:`Generation`: an iterator of
        text pieces that also counts tokens and says why it finished. ``prompt`` may be text
        (encoded with ``images``) or a :class:`Prompt` from :meth:`encode`.

        Greedy when ``temperature == 0``. Text is cut before the first ``stop`` string."""
        self._check(max_new_tokens, temperature, top_p)  # now, not at the first piece of a stream
        encoded = prompt if isinstance(prompt, Prompt) else self.encode(images, prompt)
        gen = Generation(self, encoded, max_new_tokens, temperature, top_p, stop or [], seed)
        return gen if stream else "".join(gen)

    def verbalize(self, images, prompt: str | Prompt, max_new_tokens: int = 32, final: bool = True) -> dict:
        """What each layer would answer: greedy decoding from every kept verbalizer, shallow to
        deep, then (with ``final``) the model's own head (the paper's Figure 3)."""
        encoded = prompt if isinstance(prompt, Prompt) else self.encode(images, prompt)
        layers = (*self.verbalizer_layers, FINAL) if final else self.verbalizer_layers
        return {layer: self.decode(list(self.stream_tokens(None, encoded, max_new_tokens, source=layer)))
                for layer in layers}

    def logits(self, images, prompt: str, continuation: list[int] | None = None) -> list[dict]:
        """Next-token logits after the prompt and after each token of ``continuation``:
        a list of ``{"final": (V,), layer: (V,), ...}`` (used for parity checks)."""
        state, lg = self._prefill(self.encode(images, prompt))
        out = [lg]
        for tok in continuation or []:
            out.append(self._step(state, tok))
        return out


class SpecRuntime(Runtime):
    """A backend whose prompts and images are prepared on the host by the architecture's
    torch-free spec (ONNX Runtime, TensorRT): the chat layout, image checks, preprocessing and
    image-token expansion are written once here. Subclasses set ``tok``, ``spec``,
    ``image_spec``, ``model`` (the manifest's model block) and ``image_token_id``, and run the
    vision graph in :meth:`_vision`."""

    def _vision(self, vision) -> np.ndarray:
        raise NotImplementedError

    def _encode(self, images, text):
        from vlsi.chat import chat_ids, expand_images
        from vlsi.images import load_image

        pil = [load_image(im, self.image_spec) for im in images]
        ids, _ = chat_ids(self.tok, self.user_turns(pil, text), self.spec.image_marker, for_generation=True)
        vision = None
        if pil:
            vision = self.spec.prepare_images(pil, self.image_spec, self.model)
            ids, _ = expand_images(ids, [0] * len(ids), self.image_token_id, vision.tokens)
        return Prompt(ids, vision)

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

    def __init__(self, runtime: Runtime, prompt: Prompt, max_new_tokens, temperature, top_p, stop, seed):
        self.prompt_tokens = len(prompt.ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.text = ""
        self._cancelled = False
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
        for tok in rt.stream_tokens(None, prompt, max_new_tokens, temperature, top_p, FINAL, seed):
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
        if len(ids) >= max_new_tokens:
            self.finish_reason = "length"
        text = rt.decode(ids)
        if len(text) > len(self.text):
            yield self._emit(text)

    def _emit(self, text: str) -> str:
        piece, self.text = text[len(self.text):], text
        return piece
