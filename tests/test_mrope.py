"""Our numpy M-RoPE positions equal transformers' ``get_rope_index``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlsi.archs.qwen2_vl.positions import mrope_positions


def _hf_positions(model, input_ids, grids, mask):
    ids = torch.from_numpy(input_ids)
    types = (ids == model.config.image_token_id).int()
    pos, deltas = model.model.get_rope_index(
        ids, mm_token_type_ids=types, image_grid_thw=torch.from_numpy(grids), attention_mask=torch.from_numpy(mask)
    )
    return pos.numpy(), deltas.numpy().ravel()


@pytest.fixture(scope="module")
def model(tokenizer):
    from vlsi.tiny import build_tiny

    return build_tiny("qwen2_vl", "student", tokenizer=tokenizer)[0]


@pytest.mark.parametrize("grids", [[(1, 6, 6)], [(1, 4, 8)], [(1, 10, 2)], [(1, 6, 6), (1, 4, 12)], [(1, 2, 2), (1, 2, 2), (1, 8, 4)]])
@pytest.mark.parametrize("pad", [0, 3])
def test_matches_get_rope_index(model, grids, pad):
    img = model.config.image_token_id
    rng = np.random.default_rng(len(grids) + pad)
    row = list(rng.integers(0, 300, 5))
    for t, h, w in grids:
        row += [img] * (t * h * w // 4) + list(rng.integers(0, 300, 3))
    other = list(rng.integers(0, 300, 4)) + [img] * (grids[0][1] * grids[0][2] // 4) + list(rng.integers(0, 300, 2))
    width = max(len(row), len(other)) + pad
    ids = np.zeros((2, width), np.int64)
    mask = np.zeros((2, width), np.int64)
    for r, seq in enumerate([row, other]):
        ids[r, width - len(seq):] = seq
        mask[r, width - len(seq):] = 1
    all_grids = np.array(list(grids) + [grids[0]], np.int64)
    ours, deltas = mrope_positions(ids, img, all_grids, 2, mask)
    ref, ref_deltas = _hf_positions(model, ids, all_grids, mask)
    assert np.array_equal(ours, ref)
    assert np.array_equal(deltas, ref_deltas)


def test_mismatched_grid_is_an_error(model):
    img = model.config.image_token_id
    ids = np.array([[1, 2] + [img] * 5 + [3]])
    with pytest.raises(ValueError, match="image tokens"):
        mrope_positions(ids, img, np.array([[1, 4, 4]]), 2)
