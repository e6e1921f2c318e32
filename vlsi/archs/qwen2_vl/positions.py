"""Qwen2-VL's multimodal rotary position ids (M-RoPE), in numpy.

Written once, torch-free, so that training collation and the edge runtimes compute the
same positions. Text tokens advance one position on all three axes (temporal, height,
width). An image's merged patches take a grid of positions: temporal fixed at the current
offset, height and width offset by their row and column; the text after the image resumes
at ``offset + max(grid_h, grid_w)`` (in merged-patch units).
"""

from __future__ import annotations

import numpy as np


def mrope_positions(
    input_ids: np.ndarray,
    image_token_id: int,
    image_grids: np.ndarray | list,
    spatial_merge_size: int,
    attention_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Position ids for a batch.

    Args:
        input_ids: ``(B, L)`` token ids; each image is a contiguous run of ``image_token_id``.
        image_grids: ``(N, 3)`` (t, h, w) patch grids of the batch's images, in order.
        attention_mask: ``(B, L)``; padded positions get 0 and are skipped.

    Returns:
        ``position_ids`` ``(3, B, L)`` int64 and ``deltas`` ``(B,)``: ``max position + 1 -
        number of real tokens``, which continues positions during decoding.
    """
    input_ids = np.asarray(input_ids)
    b, length = input_ids.shape
    mask = np.ones_like(input_ids, dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = iter(np.asarray(image_grids, dtype=np.int64).reshape(-1, 3))
    out = np.zeros((3, b, length), dtype=np.int64)
    deltas = np.zeros((b,), dtype=np.int64)
    for row in range(b):
        ids = input_ids[row][mask[row]]
        is_img = ids == image_token_id
        pieces, offset, i = [], 0, 0
        while i < len(ids):
            j = i
            while j < len(ids) and is_img[j] == is_img[i]:
                j += 1
            if not is_img[i]:
                pieces.append(np.broadcast_to(np.arange(offset, offset + j - i), (3, j - i)))
                offset += j - i
            else:
                # A run may hold several images back to back: consume grids until it is covered.
                k = i
                while k < j:
                    grid = next(grids, None)
                    if grid is None:
                        raise ValueError(f"row {row}: more image tokens than the image grids given cover")
                    t, h, w = grid
                    gh, gw = h // spatial_merge_size, w // spatial_merge_size
                    n = t * gh * gw
                    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
                    pieces.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + offset)
                    offset += max(gh, gw)
                    k += n
                if k != j:
                    raise ValueError(
                        f"row {row}: a run of {j - i} image tokens does not match the image grids given"
                    )
            i = j
        pos = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), dtype=np.int64)
        out[:, row, mask[row]] = pos
        deltas[row] = (pos.max() + 1 - len(ids)) if len(ids) else 0
    return out, deltas


def vision_inputs(grid_thw, merge_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs the exported vision encoder takes besides pixels: the rotary (row, col)
    position ``(N, 2)`` and the image index ``(N,)`` of every patch, in the order the image
    processor emits patches (merge-window blocks, row-major within each)."""
    pos, seg = [], []
    for img, (t, h, w) in enumerate(np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)):
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // merge_size, merge_size, w // merge_size, merge_size)
        hh = hh.reshape(shape).transpose(0, 2, 1, 3).ravel()
        ww = ww.reshape(shape).transpose(0, 2, 1, 3).ravel()
        p = np.stack([hh, ww], axis=1)
        pos.append(np.tile(p, (t, 1)))
        seg.append(np.full(len(p) * t, img, dtype=np.int64))
    return np.concatenate(pos).astype(np.int64), np.concatenate(seg)
