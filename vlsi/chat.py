"""The chat layout as token ids, torch-free (shared by training, evaluation and runtimes).

ChatML turns with a default system turn; each ``<image>`` placeholder becomes the
architecture's image marker, whose image token is then repeated once per image feature, as
the transformers processors expand it. Labels keep the assistant turns' tokens only.
"""

from __future__ import annotations

from .data.records import IMAGE_PLACEHOLDER, Turn

IGNORE_INDEX = -100
DEFAULT_SYSTEM = "You are a helpful assistant."


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def chat_ids(tokenizer, turns, image_marker: str, for_generation: bool = False,
             system_prompt: str = DEFAULT_SYSTEM) -> tuple[list[int], list[int]]:
    """``(ids, labels)`` of a conversation; each image is still one marker token."""
    turns = list(turns)
    if for_generation and turns and turns[-1].role == "assistant":
        turns = turns[:-1]
    if not turns or turns[0].role != "system":
        turns.insert(0, Turn("system", system_prompt))
    ids: list[int] = []
    labels: list[int] = []
    for turn in turns:
        text = turn.text.replace(IMAGE_PLACEHOLDER, image_marker)
        head = text_ids(tokenizer, f"<|im_start|>{turn.role}\n")
        body = text_ids(tokenizer, f"{text}<|im_end|>")
        tail = text_ids(tokenizer, "\n")
        ids += head + body + tail
        labels += [IGNORE_INDEX] * len(head)
        labels += body if turn.role == "assistant" else [IGNORE_INDEX] * len(body)
        labels += [IGNORE_INDEX] * len(tail)
    if for_generation:
        head = text_ids(tokenizer, "<|im_start|>assistant\n")
        ids += head
        labels += [IGNORE_INDEX] * len(head)
    return ids, labels


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
