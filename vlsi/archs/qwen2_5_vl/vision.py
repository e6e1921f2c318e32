"""Host-side inputs of Qwen2.5-VL's exported vision tower, in numpy only.

This module must stay importable without torch or transformers: edge runtimes compute these
arrays next to ONNX Runtime, and training code can share them.

Qwen2.5-VL's tower differs from Qwen2-VL's in how it attends. Most blocks attend within
square windows of ``window_size`` pixels (``window_size // (patch_size * merge_size)``
merged tokens a side, windows tiled from the top-left corner of each frame, the last row and
column of windows cut short); the blocks in ``fullatt_block_indexes`` attend over the whole
frame. Transformers gathers the patches into window order, slices attention by cumulative
window lengths and scatters the merged tokens back at the end.

The exported graph skips the gather and scatter: everything in a block except attention
acts on each patch alone, masked attention does not care where a key sits in the sequence,
and the merger always groups the same ``merge_size**2`` neighbours (the window reordering
moves whole merge units). So the graph keeps the processor's patch order and is told, per
patch, its rotary position, its frame and its window; it masks attention with them. Window
and frame ids are global (unique across all images of a call), so one graph serves any
number of images of any size.
"""

from __future__ import annotations

import numpy as np

INPUT_NAMES = ("positions", "image_index", "window_id")
"""The graph's inputs besides ``pixel_values``, in forward order (see :func:`vision_inputs`)."""


def _grids(grid_thw, merge_size: int) -> np.ndarray:
    """``grid_thw`` as an ``(n, 3)`` int64 array, checked against the merge size."""
    grids = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    if (grids <= 0).any():
        raise ValueError(f"grid_thw entries must be positive, got {grids.tolist()}")
    if (grids[:, 1:] % merge_size).any():
        raise ValueError(f"grid heights and widths must be multiples of merge_size={merge_size}, "
                         f"got {grids.tolist()}")
    return grids


def _unit_of_patch(h: int, w: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of each patch of one ``h x w`` frame, and of its merge unit, in the
    processor's order: merge units row-major, the ``m x m`` patches of a unit row-major.

    Returns ``(patch_rc, unit_rc)``, both ``(h * w, 2)`` int64."""
    # axes: unit row, unit col, row inside the unit, col inside the unit
    ur, uc, ir, ic = np.meshgrid(np.arange(h // m), np.arange(w // m), np.arange(m), np.arange(m), indexing="ij")
    unit = np.stack([ur.ravel(), uc.ravel()], axis=1)
    patch = unit * m + np.stack([ir.ravel(), ic.ravel()], axis=1)
    return patch, unit


def vision_inputs(grid_thw, merge_size: int, patch_size: int, window_size: int) -> dict[str, np.ndarray]:
    """Inputs the exported Qwen2.5-VL vision graph takes besides ``pixel_values``.

    Args:
        grid_thw: ``(n, 3)`` (t, h, w) patch grids of the call's images (or videos), in the
            order their patches are concatenated in ``pixel_values``.
        merge_size, patch_size, window_size: the vision config's ``spatial_merge_size``,
            ``patch_size`` and ``window_size`` (pixels).

    Returns, by graph input name, in the graph's input order (``N = sum(t * h * w)``, all
    int64, every row in the image processor's patch order, as ``pixel_values``):

    - ``positions`` ``(N, 2)``: rotary (row, col) of each patch inside its frame.
    - ``image_index`` ``(N,)``: which (image, frame) the patch belongs to, counted across the
      call; full-attention blocks attend among equal values. An image has one frame, so this
      is the image's index; a video's frames attend separately, as in transformers.
    - ``window_id`` ``(N,)``: which attention window the patch lies in, counted across the
      call (never shared between frames or images); windowed blocks attend among equal values.

    The graph's output ``image_embeds`` has ``N / merge_size**2`` rows, also in processor
    order (what ``get_image_features`` returns, concatenated).
    """
    m = int(merge_size)
    side = int(window_size) // (int(patch_size) * m)  # window side in merge units
    if side < 1:
        raise ValueError(f"window_size={window_size} is smaller than one merge unit ({patch_size * m} px)")
    positions, frames, windows = [], [], []
    frame, first_window = 0, 0
    for t, h, w in _grids(grid_thw, m):
        patch, unit = _unit_of_patch(int(h), int(w), m)
        across = -(-(int(w) // m) // side)  # windows per row, the last one possibly narrower
        down = -(-(int(h) // m) // side)
        local = (unit[:, 0] // side) * across + unit[:, 1] // side
        for _ in range(int(t)):
            positions.append(patch)
            frames.append(np.full(len(patch), frame, dtype=np.int64))
            windows.append(local + first_window)
            frame += 1
            first_window += across * down

    def cat(parts, shape):
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(shape, dtype=np.int64)

    return {
        "positions": cat(positions, (0, 2)),
        "image_index": cat(frames, (0,)),
        "window_id": cat(windows, (0,)),
    }
