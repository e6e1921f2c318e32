"""What the speculative-decoding tests of both backends share: noise images, prompts (text and
images), plain and speculative answers to the same prompt, and the "agreeing" checkpoint."""

from __future__ import annotations

import numpy as np


def noise_image(seed=0, size=84):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8"))


PROMPTS = [([noise_image(0)], "describe the picture"), ([], "count to ten"),
           ([noise_image(3, 112)], "what colour is it?"), ([noise_image(5)], "where is the circle?"),
           ([], "tell me a story about a square")]


def plain_and_speculative(rt, images, prompt, n, spec, ignore_eos=True):
    """-> (plain tokens, speculative tokens, the speculative run's stats), both uncached."""
    plain = list(rt.stream_tokens(images, prompt, n, ignore_eos=ignore_eos, reuse=False))
    stats: dict = {}
    drafted = list(rt.stream_tokens(images, prompt, n, ignore_eos=ignore_eos, reuse=False, stats=stats,
                                    speculative=spec))
    return plain, drafted, stats


def agreeing_checkpoint(ckpt, out, keep: int = 3):
    """``ckpt`` with the layers above ``keep`` adding nothing to the residual (output projections
    zeroed), saved to ``out``: layer ``keep``'s untrained head (the logit lens) is then the
    model's own head, so every draft from it is accepted."""
    import torch

    from vlsi.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(ckpt)
    with torch.no_grad():
        for layer in ck.adapter.language_model(ck.model).layers[keep:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    save_checkpoint(out, ck.model, ck.tokenizer, ck.image_processor, ck.verbalizers)
    return out


def check_eos_and_budgets(rt, layer: int, drafting_rt=None):
    """With EOS honoured and budgets that end mid-cycle, answers (and where they stop) are plain
    decoding's; then, with the drafter of ``drafting_rt`` (default ``rt``) made to love the end
    of sequence (an EOS drafted inside a run), still plain decoding's."""
    for n in (1, 2, 3, 5, 7, 11):
        for images, prompt in PROMPTS[:3]:
            plain, drafted, _ = plain_and_speculative(rt, images, prompt, n, {"layer": layer, "tokens": 4},
                                                      ignore_eos=False)
            assert drafted == plain and len(drafted) <= n
    rt = drafting_rt or rt
    eos, real = rt.eos_ids[0], rt._draft_logits

    def eos_loving(drafted):
        out = real(drafted).copy()
        out[eos] = out.max() + 1.0
        return out

    rt._draft_logits = eos_loving
    for images, prompt in PROMPTS:
        plain, drafted, stats = plain_and_speculative(rt, images, prompt, 16, {"layer": 3, "tokens": 4},
                                                      ignore_eos=False)
        assert drafted == plain and stats["drafted"] >= 1


def check_reduced_head(rt, reduced, full, ids):
    """A reduced-vocabulary draft head: the full head's logits on its ids (the argmax among
    them), -inf elsewhere; drafting with it keeps plain decoding's answers."""
    assert int(np.argmax(reduced)) in ids
    np.testing.assert_allclose(reduced[ids], full[ids], rtol=1e-5, atol=1e-5)
    assert np.isneginf(np.delete(reduced, ids)).all()
    for images, prompt in PROMPTS[:3]:
        plain, drafted, stats = plain_and_speculative(rt, images, prompt, 16, {"layer": 3, "tokens": 4})
        assert drafted == plain and stats["drafted"] > 0
