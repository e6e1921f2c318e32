"""Records -> token ids, labels and image tensors, and batches of them.

Prompts follow the checkpoint's chat layout (ChatML with a default system turn). Each
``<image>`` placeholder becomes the adapter's image marker, and the marker's image token
is repeated once per image feature, exactly as the transformers processors expand it.
Labels keep only the assistant turns' tokens (their text and closing ``<|im_end|>``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DataError
from .records import Record
from ..chat import DEFAULT_SYSTEM, IGNORE_INDEX


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    """``IGNORE_INDEX`` everywhere but assistant tokens."""
    processed: dict | None
    """The adapter's processed images of this record (None without images)."""
    record: Record


class Encoder:
    """Turns records into model inputs for one checkpoint (adapter, tokenizer, image processor)."""

    def __init__(self, adapter, tokenizer, image_processor, config, max_length: int = 2048,
                 system_prompt: str = DEFAULT_SYSTEM):
        self.adapter = adapter
        self.tok = tokenizer
        self.proc = image_processor
        self.config = config
        self.max_length = max_length
        self.system_prompt = system_prompt
        spec = adapter.spec
        self.image_token_id = spec.token_id(tokenizer, spec.image_token)
        self.pad_id = spec.pad_id(tokenizer)
        self.eos_ids = spec.eos_ids(tokenizer)

    def text_ids(self, text: str) -> list[int]:
        from ..chat import text_ids

        return text_ids(self.tok, text)

    def encode(self, record: Record, for_generation: bool = False) -> Encoded:
        """Encode a record. ``for_generation`` drops the last assistant turn and ends with the
        assistant header, ready for decoding."""
        from ..chat import chat_ids
        from ..images import ensure_rgb

        ids, labels = chat_ids(self.tok, record.turns, self.adapter.image_marker, for_generation, self.system_prompt)
        processed = None
        if record.images:
            images = [ensure_rgb(ref, source=record.source, record=record.id) for ref in record.images]
            processed = self.adapter.process_images(self.proc, images)
            ids, labels = self._expand_images(record, ids, labels, processed)
        if len(ids) > self.max_length:
            raise DataError(
                record.source, record.id,
                f"{len(ids)} tokens is longer than max_length={self.max_length}; raise max_length "
                f"or drop long samples with the skip option",
            )
        return Encoded(ids, labels, processed, record)

    def _expand_images(self, record, ids, labels, processed):
        from ..chat import expand_images

        counts = self.adapter.image_token_counts(self.config, self.proc, processed)
        try:
            return expand_images(ids, labels, self.image_token_id, counts)
        except ValueError as e:
            raise DataError(record.source, record.id, str(e)) from None

    def collate(self, items: list[Encoded], pad_left: bool = False) -> dict:
        """Pad a list of encoded records into a batch of tensors for the model's forward.

        Training pads on the right; generation pads on the left so every row ends at the
        same position. Returns ``input_ids``, ``attention_mask``, ``labels``,
        ``position_ids`` and the adapter's image arguments.
        """
        import torch

        width = max(len(it.input_ids) for it in items)
        ids = np.full((len(items), width), self.pad_id, dtype=np.int64)
        lab = np.full((len(items), width), IGNORE_INDEX, dtype=np.int64)
        mask = np.zeros((len(items), width), dtype=np.int64)
        for row, it in enumerate(items):
            n = len(it.input_ids)
            sl = slice(width - n, width) if pad_left else slice(0, n)
            ids[row, sl] = it.input_ids
            lab[row, sl] = it.labels
            mask[row, sl] = 1
        processed = self.adapter.concat_processed([it.processed for it in items if it.processed])
        pos = self.adapter.position_ids(self.config, ids, mask, processed)
        batch = {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(lab),
            "position_ids": torch.from_numpy(pos),
        }
        batch.update(self.adapter.forward_image_kwargs(processed))
        return batch
