"""The in-memory form every loader produces, whatever the file format.

A :class:`Record` is one conversation about zero or more images. Image positions in the
text are marked with the literal placeholder ``<image>``; the number of placeholders in a
record equals ``len(images)``. Labels are later taken from the ``assistant`` turns only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")

#: An image is a file path, or the encoded bytes of an image file (TSV / Parquet rows); a
#: runtime's prompt may also hold an already checked PIL image.
ImageRef = Union[Path, bytes]


@dataclass(frozen=True)
class Turn:
    role: str
    """One of ``ROLES``."""
    text: str
    """The message text, with ``<image>`` where an image goes."""


@dataclass(frozen=True)
class Record:
    id: str
    """Stable identifier: the record's own id when the file has one, else its index."""
    turns: tuple[Turn, ...]
    images: tuple[ImageRef, ...]
    source: str
    """``file`` the record came from, for error messages."""
    category: str | None = None
    """Question family (synthetic data, VLMEvalKit ``category``), used to break down accuracy."""
    choices: dict[str, str] | None = None
    """Multiple-choice options ``{"A": ..., "B": ...}`` when the record is an MC question."""
    answer: str | None = None
    """Reference answer for evaluation: the option letter for MC, else the expected text."""
    meta: dict = field(default_factory=dict, compare=False)
    """Anything else the source carried (e.g. synthetic scene attributes)."""


@dataclass
class LoadReport:
    """What a loader did: how many records it kept, and what it skipped and why."""

    path: str
    kept: int = 0
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        s = f"{self.path}: {self.kept} records kept"
        if self.skipped:
            s += f", {len(self.skipped)} skipped (first: {self.skipped[0]})"
        return s
