"""The parity tolerance table, one row per precision: the CPU gate of every export and the
device parity ``vlsi build`` records both read it. Torch-free (a Jetson imports it without torch)."""

from __future__ import annotations

# metric -> (comparison, bound); "<=" bounds errors, ">=" bounds agreement rates.
TOLERANCES: dict[str, dict[str, tuple[str, float]]] = {
    "fp32": {"logits_max_abs": ("<=", 1e-4), "vision_max_abs": ("<=", 1e-4), "top1": (">=", 1.0),
             "greedy_match": (">=", 1.0), "kl_mean": ("<=", 1e-6), "acc_drop": ("<=", 0.0),
             "verbalizer_top1": (">=", 1.0), "verbalizer_logits_max_abs": ("<=", 1e-4)},
    # shallow verbalizer heads are often nearly tied between two tokens (layer 2 of the
    # quickstart student answers 44% right): fp16's ~0.03 logit error flips about one such
    # position in a hundred, so their bound is looser than the final head's
    "fp16": {"top1": (">=", 0.995), "kl_mean": ("<=", 1e-3), "acc_drop": ("<=", 0.01),
             "verbalizer_top1": (">=", 0.98)},
    "int8": {"top1": (">=", 0.98), "kl_mean": ("<=", 0.02), "acc_drop": ("<=", 0.01),
             "verbalizer_top1": (">=", 0.95)},
    "int8-nbits": {"top1": (">=", 0.98), "kl_mean": ("<=", 0.02), "acc_drop": ("<=", 0.01),
                   "verbalizer_top1": (">=", 0.95)},
    "int4": {"top1": (">=", 0.95), "kl_mean": ("<=", 0.05), "acc_drop": ("<=", 0.03),
             "verbalizer_top1": (">=", 0.90)},
}
# llama.cpp (GGUF). Its f32 path is not bit-equal to PyTorch: matmuls accumulate in another
# order and clip's merger uses the tanh GELU where transformers uses erf, so image prompts
# differ by a few 1e-3 in the logits; greedy decoding and top-1 must still agree everywhere.
_GGUF_F32 = {"tokens_match": (">=", 1.0), "logits_max_abs": ("<=", 2e-2), "vision_max_abs": ("<=", 2e-2),
             "top1": (">=", 1.0), "greedy_match": (">=", 1.0), "kl_mean": ("<=", 1e-5), "acc_drop": ("<=", 0.0),
             "verbalizer_top1": (">=", 0.99)}
TOLERANCES.update({
    "f32": _GGUF_F32,
    "f16": {"tokens_match": (">=", 1.0), "top1": (">=", 0.995), "greedy_match": (">=", 1.0), "kl_mean": ("<=", 1e-3),
            "acc_drop": ("<=", 0.01), "verbalizer_top1": (">=", 0.98)},
    "q8_0": {"tokens_match": (">=", 1.0), "top1": (">=", 0.98), "kl_mean": ("<=", 0.005), "acc_drop": ("<=", 0.01),
             "verbalizer_top1": (">=", 0.95)},
    "q6_k": {"tokens_match": (">=", 1.0), "top1": (">=", 0.97), "kl_mean": ("<=", 0.01), "acc_drop": ("<=", 0.02),
             "verbalizer_top1": (">=", 0.93)},
    "q5_k_m": {"tokens_match": (">=", 1.0), "top1": (">=", 0.95), "kl_mean": ("<=", 0.03), "acc_drop": ("<=", 0.03),
               "verbalizer_top1": (">=", 0.90)},
    "q4_k_m": {"tokens_match": (">=", 1.0), "top1": (">=", 0.90), "kl_mean": ("<=", 0.05), "acc_drop": ("<=", 0.03),
               "verbalizer_top1": (">=", 0.85)},
    "q4_0": {"tokens_match": (">=", 1.0), "top1": (">=", 0.90), "kl_mean": ("<=", 0.05), "acc_drop": ("<=", 0.03),
             "verbalizer_top1": (">=", 0.85)},
})


# TensorRT graphs (vlsi export --target tensorrt), checked on ONNX Runtime's CPU provider: fp16
# compute throughout (fp16 KV cache and activations, not only weights), INT8 with activations
# quantised too (Q/DQ), INT4 weight-only block-wise. Rows are "tensorrt-<precision>". INT4's
# blocks are 128 (or 64) weights wide, as TensorRT requires, against the ONNX target's 32: about
# twice the rounding error per block, so its top-1 bound is the GGUF q4 rows', not ONNX int4's
# (a 40-step tiny student with every matrix in INT4 measured 0.94).
TOLERANCES.update({
    "tensorrt-fp16": {"top1": (">=", 0.99), "greedy_match": (">=", 0.9), "kl_mean": ("<=", 2e-3),
                      "acc_drop": ("<=", 0.01), "verbalizer_top1": (">=", 0.97)},
    "tensorrt-int8": {"top1": (">=", 0.97), "kl_mean": ("<=", 0.03), "acc_drop": ("<=", 0.02),
                      "verbalizer_top1": (">=", 0.93)},
    "tensorrt-int4": {"top1": (">=", 0.90), "kl_mean": ("<=", 0.05), "acc_drop": ("<=", 0.03),
                      "verbalizer_top1": (">=", 0.90)},
    "tensorrt-fp8": {"top1": (">=", 0.97), "kl_mean": ("<=", 0.03), "acc_drop": ("<=", 0.02),
                     "verbalizer_top1": (">=", 0.93)},
})


def tolerance_key(manifest) -> str:
    """The ``TOLERANCES`` row of an artifact: its precision, prefixed by the target where one
    target's precision means something else (TensorRT's fp16 computes in fp16 end to end)."""
    return f"tensorrt-{manifest.precision}" if manifest.target == "tensorrt" else manifest.precision
