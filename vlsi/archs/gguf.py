"""What the GGUF target needs from an architecture, and the declarative tensor tables it uses.

Tables are one line per tensor. ``{bid}`` stands for the block index. A ``None`` target means
"deliberately not written to this file" (with the reason beside it); a checkpoint tensor that
matches no line is an error, so a new architecture variant cannot be half-converted silently.
A third item names a transform: ``split3`` cuts a fused q/k/v tensor into thirds along its
first axis (``{qkv}`` in the target becomes q, k, v); ``temporal`` cuts the 3-D patch
convolution into its two frames (the second goes to ``<target>.1``), as llama.cpp's clip runs
two 2-D convolutions.

An architecture's ``gguf.py`` subclasses :class:`GgufParts`: its tables, the text
architecture and projector names llama.cpp knows, the hyper-parameters, the vision checks
(refusing towers llama.cpp would run differently from transformers) and the image token
bounds. The writer itself (:mod:`vlsi_export.gguf_target`) knows no architecture.
"""

from __future__ import annotations

import re

from vlsi.errors import UnsupportedArchitectureError


def _compile(pattern: str) -> re.Pattern:
    rx = re.escape(pattern).replace(r"\{bid\}", r"(?P<bid>\d+)").replace(r"\{rest\}", r"(?P<rest>.+)")
    return re.compile(rx + r"\Z")


class TensorTable:
    """Maps checkpoint tensor names through one of the tables above."""

    def __init__(self, rows: list[tuple], what: str, where: str = "the architecture's gguf.py"):
        self.rows = [(_compile(row[0]), row[1], row[2] if len(row) > 2 else None) for row in rows]
        self.what = what
        self.where = where

    def target(self, name: str) -> str | None:
        """The GGUF name for ``name``, ``None`` when it is deliberately left out; raises
        ``KeyError`` naming the tensor when no line matches."""
        return self._match(name)[0]

    def convert(self, name: str, array) -> list[tuple[str, object]]:
        """``[(gguf_name, array), ...]`` for one checkpoint tensor (empty when left out)."""
        dst, transform = self._match(name)
        if dst is None:
            return []
        if transform == "split3":
            if array.shape[0] % 3:
                raise ValueError(f"{name}: first axis {array.shape[0]} does not split into q, k, v")
            n = array.shape[0] // 3
            return [(dst.replace("{qkv}", part), array[i * n:(i + 1) * n]) for i, part in enumerate("qkv")]
        if transform == "temporal":
            if array.ndim != 5 or array.shape[2] != 2:
                raise ValueError(f"{name}: shape {tuple(array.shape)}; llama.cpp's clip needs a patch convolution "
                                 "over exactly 2 frames (temporal_patch_size 2)")
            return [(dst, array[:, :, 0]), (dst + ".1", array[:, :, 1])]
        return [(dst, array)]

    def _match(self, name: str) -> tuple[str | None, str | None]:
        for rx, dst, transform in self.rows:
            m = rx.match(name)
            if m:
                if dst is None:
                    return None, None
                groups = {k: v for k, v in m.groupdict().items() if k != "rest"}
                return dst.replace("{bid}", groups.get("bid", "{bid}")), transform
        raise KeyError(f"{self.what}: no GGUF name for checkpoint tensor {name!r}; add a line to "
                       f"the architecture's gguf.py table (or map it to None to leave it out on purpose)")


class GgufParts:
    """Base class of an architecture's GGUF part."""

    text_arch: str = ""
    """llama.cpp's name of the text architecture (``general.architecture``)."""
    projector_type: str = ""
    """llama.cpp clip's ``clip.projector_type``."""
    text_table: list[tuple] = []
    vision_table: list[tuple] = []
    clip_image_tokens: tuple[int, int] | None = None
    """``(min, max)`` merged image tokens llama.cpp's clip resizes every image into for this
    projector when the caller sets no ``image_min_tokens`` / ``image_max_tokens``; ``None``
    where clip reads the bounds from the mmproj."""

    def text_tensors(self) -> TensorTable:
        return TensorTable(self.text_table, f"{self.text_arch} text model", type(self).__module__)

    def vision_tensors(self) -> TensorTable:
        return TensorTable(self.vision_table, f"{self.projector_type} vision projector", type(self).__module__)

    def image_hparams(self, w, pre: dict) -> None:
        """Write the image processor's settings (``pre``: ``preprocessor_config.json``) that
        clip reads; nothing by default."""

    def clip_resize(self, pre: dict) -> dict:
        """How llama.cpp's own tools size images for this projector against the model's processor
        (``{"differs": False}`` when they agree or clip reads the bounds from the file)."""
        return {"differs": False}

    def refuse(self, problems: list[str]) -> None:
        if problems:
            raise UnsupportedArchitectureError(
                "llama.cpp cannot run this vision tower as trained: " + "; ".join(problems)
                + ". Export it with --target onnx instead")
