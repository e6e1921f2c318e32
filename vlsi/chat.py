"""The chat layout as token ids, torch-free (shared by training, evaluation and runtimes).

ChatML turns with a default system turn; each ``<image>`` placeholder becomes the
architecture's image marker, whose image token is then repeated once per image feature, as
the transformers processors expand it. Labels keep the assistant turns' tokens only.
"""

from __future__ import annotations

from .data.records import IMAGE_PLACEHOLDER, Turn
from .errors import ConfigError

IGNORE_INDEX = -100
DEFAULT_SYSTEM = "You are a helpful assistant."


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def chat_text(turns, image_marker: str, for_generation: bool = False,
              system_prompt: str = DEFAULT_SYSTEM) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as text in the chat layout (what the stored chat template renders), and
    the character span of each assistant answer (its text and closing ``<|im_end|>``)."""
    turns = list(turns)
    if for_generation and turns and turns[-1].role == "assistant":
        turns = turns[:-1]
    if not turns or turns[0].role != "system":
        turns.insert(0, Turn("system", system_prompt))
    text, answers = "", []
    for turn in turns:
        text += f"<|im_start|>{turn.role}\n"
        start = len(text)
        text += turn.text.replace(IMAGE_PLACEHOLDER, image_marker) + "<|im_end|>"
        if turn.role == "assistant":
            answers.append((start, len(text)))
        text += "\n"
    if for_generation:
        text += "<|im_start|>assistant\n"
    return text, answers


def chat_ids(tokenizer, turns, image_marker: str, for_generation: bool = False,
             system_prompt: str = DEFAULT_SYSTEM) -> tuple[list[int], list[int]]:
    """``(ids, labels)`` of a conversation; each image is still one marker token. The whole
    rendered text is tokenised at once, as transformers and llama.cpp tokenise a chat
    template's output; labels keep the tokens that start inside an assistant answer."""
    text, answers = chat_text(turns, image_marker, for_generation, system_prompt)
    enc = tokenizer.encode(text, add_special_tokens=False)
    labels = [IGNORE_INDEX] * len(enc.ids)
    for k, (start, _) in enumerate(enc.offsets):
        if any(a <= start < b for a, b in answers):
            labels[k] = enc.ids[k]
    return list(enc.ids), labels


def expand_images(ids, labels, image_token_id: int, counts: list[int]) -> tuple[list[int], list[int]]:
    """Repeat the ``k``-th image token ``counts[k]`` times. Raises ValueError on a count mismatch."""
    where = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(where) != len(counts):
        raise ValueError(f"{len(where)} image markers in the prompt for {len(counts)} images")
    out_ids, out_labels, prev = [], [], 0
    for pos, count in zip(where, counts):
        out_ids += ids[prev:pos] + [image_token_id] * count
        out_labels += labels[prev:pos] + [IGNORE_INDEX] * count
        prev = pos + 1
    return out_ids + ids[prev:], out_labels + labels[prev:]


# --------------------------------------------------------------------------- chat messages

MESSAGE_ROLES = ("system", "developer", "user", "assistant")
"""Roles a chat message may have; ``developer`` (OpenAI's newer name) is a system turn."""


class MessageError(ConfigError):
    """A chat message list that cannot be rendered; ``param`` names the offending field
    (``messages[2].content[0].type``), for API errors."""

    def __init__(self, message: str, param: str = "messages"):
        super().__init__(message)
        self.param = param


def _image_part(part: dict):
    """The image a content part carries, or None when it is not an image part. Accepts
    OpenAI's ``{"type": "image_url", "image_url": {"url": ...}}`` and transformers'
    ``{"type": "image", "image" | "url" | "path": ...}``."""
    kind = part.get("type")
    if kind == "image_url" or (kind is None and "image_url" in part):
        iu = part.get("image_url")
        return iu.get("url") if isinstance(iu, dict) else iu
    if kind == "image" or (kind is None and "image" in part):
        for key in ("image", "url", "path"):
            if part.get(key) is not None:
                return part[key]
        return None
    return False  # not an image part


def conversation(messages) -> tuple[tuple[Turn, ...], list]:
    """Chat messages -> ``(turns, images)``: the layout every backend, the stored chat template
    and the training data share.

    A message is ``{"role", "content"}``; ``content`` is a string or a list of parts (text,
    and images in user turns). A message's parts are joined with a newline and each image
    becomes the ``<image>`` placeholder, so ``[image, text]`` renders as ``"<image>\\nquestion"``,
    the layout vlsi trains on. Images are returned as given (paths, bytes, PIL images or data
    URIs), in prompt order. Raises :class:`MessageError` naming the field at fault."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise MessageError("`messages` must be a non-empty list of {role, content} messages")
    turns: list[Turn] = []
    images: list = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise MessageError(f"{where} must be an object with `role` and `content`", where)
        role = m.get("role")
        if role not in MESSAGE_ROLES:
            raise MessageError(f"{where}.role is {role!r:.40}; it must be one of {', '.join(MESSAGE_ROLES)}",
                               f"{where}.role")
        role = "system" if role == "developer" else role
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, str):
            pieces = [content]
        elif isinstance(content, (list, tuple)):
            pieces = []
            for j, part in enumerate(content):
                at = f"{where}.content[{j}]"
                if isinstance(part, str):
                    pieces.append(part)
                    continue
                if not isinstance(part, dict):
                    raise MessageError(f"{at} must be a string or an object with a `type`", at)
                image = _image_part(part)
                if image is False:
                    if part.get("type") != "text":
                        raise MessageError(f"{at}.type is {part.get('type')!r:.40}; use 'text', 'image_url' or "
                                           "'image'", f"{at}.type")
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise MessageError(f"{at}.text must be a string", f"{at}.text")
                    pieces.append(text)
                    continue
                if image is None:
                    raise MessageError(f"{at} is an image part without an image", at)
                if role != "user":
                    raise MessageError(f"{at}: only user messages may hold images, not {role!r} ones", at)
                images.append(image)
                pieces.append(IMAGE_PLACEHOLDER)
        else:
            raise MessageError(f"{where}.content must be a string or a list of parts", f"{where}.content")
        for k, piece in enumerate(pieces):
            try:
                piece.encode("utf-8")
            except UnicodeEncodeError:
                raise MessageError(f"{where}: the text is not valid Unicode (a lone surrogate)",
                                   f"{where}.content") from None
            if piece != IMAGE_PLACEHOLDER and IMAGE_PLACEHOLDER in piece:
                raise MessageError(f"{where}: the text holds {IMAGE_PLACEHOLDER!r}; send images as image parts",
                                   f"{where}.content")
        turns.append(Turn(role, "\n".join(pieces)))
    if turns[-1].role == "assistant":
        raise MessageError(f"messages[{len(turns) - 1}] is an assistant turn; the conversation must end with a "
                           "user (or system) message to answer", f"messages[{len(turns) - 1}].role")
    return tuple(turns), images


def chat_template(image_marker: str = "<|vision_start|><|image_pad|><|vision_end|>") -> str:
    """The Jinja chat template of this layout for an architecture's image marker (written into
    every checkpoint and artifact: ``tokenizer_config.json``, ``chat_template.jinja``, the GGUF)."""
    from importlib import resources

    text = resources.files("vlsi").joinpath("templates/chat.jinja").read_text()
    return text.replace("__IMAGE_MARKER__", image_marker)


def is_messages(x) -> bool:
    """Whether ``x`` looks like a list of chat messages (rather than a list of images)."""
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(m, dict) and "role" in m for m in x)


def one_turn(images: list, prompt: str) -> tuple[Turn, ...]:
    """The ``(images, prompt)`` shortcut as one user turn: images first, each on its own line
    (unless the prompt places ``<image>`` itself), then the text."""
    n = prompt.count(IMAGE_PLACEHOLDER)
    if n == 0:
        prompt = f"{IMAGE_PLACEHOLDER}\n" * len(images) + prompt
    elif n != len(images):
        raise MessageError(f"the prompt has {n} <image> placeholders for {len(images)} images", "prompt")
    return (Turn("user", prompt),)
