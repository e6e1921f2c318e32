"""Device presets of the TensorRT target: what each device can run, the optimisation profiles
its engines are built with, and the memory budget that says whether a model fits.

An engine is built for ranges of input shapes (TensorRT's optimisation profiles), and the
largest shapes decide its memory. So a preset fixes the context length and the image tokens
one prompt may take; ``vlsi export`` writes the profiles of every preset into ``build.json``
and ``vlsi build`` builds the one asked for (``--max-context`` / ``--max-image-tokens``
recompute them). The budget adds what the device must hold at once: the engines' weights,
the KV cache at full context, the vision graph's peak activations, the embedding rows' table
(mapped; on a Jetson, CPU and GPU share the same memory) and the runtime's own overhead.
Torch-free.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    device: str
    memory_gib: float
    """Memory the device has for the model (a Jetson's is shared by CPU and GPU)."""
    unified: bool
    """CPU and GPU share the memory (Jetson): host-side tables count against the budget."""
    compute_capability: tuple[int, ...]
    """SM versions of the GPUs it stands for (e.g. 87 for Orin)."""
    tensorrt: tuple[str, ...]
    """TensorRT versions it ships or that are usual on it (the op check runs against these)."""
    max_context: int
    max_image_tokens: int
    overhead_gib: float
    """CUDA context, TensorRT runtime, cuDNN/cuBLAS handles, the OS share on a Jetson."""


PRESETS: dict[str, Preset] = {
    # JetPack 6.1 and 6.2 (TensorRT 10.3) on the 8 GB module; the OS and desktop take ~1.5 GB of it
    "orin-nano": Preset("orin-nano", "Jetson Orin Nano 8GB (JetPack 6.1+)", 8.0, True, (87,), ("10.3",),
                        max_context=1024, max_image_tokens=256, overhead_gib=2.0),
    "orin-agx": Preset("orin-agx", "Jetson AGX Orin 32/64GB (JetPack 6.1+)", 32.0, True, (87,), ("10.3",),
                       max_context=4096, max_image_tokens=1024, overhead_gib=2.5),
    # an RTX 4090-class card with TensorRT 10.x or 11.x
    "desktop": Preset("desktop", "desktop GPU, 24 GB (Ada/Hopper/Blackwell)", 24.0, False, (89, 90, 100, 120),
                      ("10.15", "11"), max_context=8192, max_image_tokens=4096, overhead_gib=1.0),
}
DEFAULT_PRESET = "orin-nano"

FP8_SM = 89
"""FP8 tensor cores: Ada (SM89) and later. Orin is SM87."""
NVFP4_SM = 100


def get_preset(name: str) -> Preset:
    from vlsi.errors import ConfigError

    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r} is not one of {', '.join(PRESETS)}")
    return PRESETS[name]


def check_precision(precision: str, sm: int, where: str) -> None:
    """Refuse a precision the GPU cannot run (``sm``: compute capability as 87, 89, ...)."""
    from vlsi.errors import ConfigError

    need = {"fp8": FP8_SM, "nvfp4": NVFP4_SM}.get(precision)
    if need is not None and sm < need:
        raise ConfigError(f"{precision} needs a GPU of compute capability {need // 10}.{need % 10} or newer; "
                          f"{where} is {sm // 10}.{sm % 10}: export with --quant int8 or --quant int4 instead")


def _shape(dims: list, fill: dict) -> list[int]:
    return [fill.get(d, d) if isinstance(d, str) else int(d) for d in dims]


def profiles(model: dict, vision_inputs: list[dict], vision_caps: dict[str, int], max_context: int,
             max_image_tokens: int) -> dict[str, list[dict]]:
    """Optimisation profiles, ``{graph: [{"name", "shapes": {input: [min, opt, max]}}]}``.

    Decoder: a ``prefill`` profile (1..max_context new tokens after 0..max_context-1 cached) and a
    ``decode`` profile (one token after 1..max_context-1 cached): TensorRT picks kernels per
    profile, and decoding one token is a different problem from a prompt. Batch 1. Vision:
    one profile over the first axis of every input, up to what ``max_image_tokens`` needs
    (``vision_inputs`` are the graph's signature entries, ``vision_caps`` the spec's caps)."""
    d, kv, hd = model["hidden_size"], model["num_kv_heads"], model["head_dim"]
    n = model["num_layers"]
    ctx = max_context

    def decoder(new: tuple[int, int, int], past: tuple[int, int, int]) -> dict:
        shapes = {"inputs_embeds": [[1, new[i], d] for i in range(3)],
                  "attention_mask": [[1, new[i] + past[i]] for i in range(3)],
                  "rope_cos": [[1, new[i], hd] for i in range(3)],
                  "rope_sin": [[1, new[i], hd] for i in range(3)]}
        for layer in range(n):
            for kind in ("key", "value"):
                shapes[f"past_{kind}_{layer}"] = [[1, kv, past[i], hd] for i in range(3)]
        return shapes

    opt_prompt = min(ctx, max(16, max_image_tokens + 64))
    out = {"decoder": [
        {"name": "prefill", "shapes": decoder((1, opt_prompt, ctx), (0, 0, ctx - 1))},
        {"name": "decode", "shapes": decoder((1, 1, 1), (1, min(ctx - 1, opt_prompt + 64), ctx - 1))},
    ]}
    shapes = {}
    for entry in vision_inputs:
        cap = vision_caps.get(entry["name"], vision_caps.get("*"))
        dims = entry["shape"]
        lo, hi = 1, max(1, int(cap))
        opt = max(lo, hi // 4)
        shapes[entry["name"]] = [_shape(dims, {dims[0]: v}) if isinstance(dims[0], str) else _shape(dims, {})
                                 for v in (lo, opt, hi)]
    out["vision"] = [{"name": "images", "shapes": shapes}]
    return out


@dataclass
class Budget:
    preset: str
    weights_gib: float
    kv_cache_gib: float
    vision_peak_gib: float
    embed_table_gib: float
    overhead_gib: float
    total_gib: float
    available_gib: float
    fits: bool
    build_peak_gib: float
    """What building the engines needs on the device (TensorRT holds 3-4x the weights)."""

    def line(self) -> str:
        verdict = "fits" if self.fits else "DOES NOT FIT"
        return (f"{self.preset}: {self.total_gib:.2f} GiB of {self.available_gib:.0f} GiB ({verdict}): weights "
                f"{self.weights_gib:.2f}, KV {self.kv_cache_gib:.2f}, vision peak {self.vision_peak_gib:.2f}, "
                f"embedding table {self.embed_table_gib:.2f}, runtime {self.overhead_gib:.2f}; "
                f"build needs ~{self.build_peak_gib:.1f}")

    def to_dict(self) -> dict:
        return asdict(self)


GIB = float(1 << 30)


def weight_bytes(folder, files) -> int:
    """Bytes of the engines' weights: the graph ``files`` (relative to ``folder``) and their
    external data, as written."""
    from pathlib import Path

    total = 0
    for name in files:
        p = Path(folder) / name
        total += p.stat().st_size
        data = p.with_name(p.name + ".data")
        if data.is_file():
            total += data.stat().st_size
    return total


def budget(preset: Preset, model: dict, weight_bytes: int, embed_bytes: int, vision: dict, kv_bytes: int = 2,
           max_context: int | None = None, max_image_tokens: int | None = None) -> Budget:
    """The memory ``preset``'s device needs for this model at its caps.

    ``weight_bytes``: the engines' weights (graph initializers as written); ``embed_bytes``: the
    token table; ``vision``: ``{"patches_per_token", "heads", "width"}`` of the vision tower
    (its peak is one block's fp32 attention scores over all patches, plus a few activations);
    ``kv_bytes``: bytes per cached value (fp16: 2)."""
    ctx = max_context or preset.max_context
    tokens = max_image_tokens or preset.max_image_tokens
    kv = 2 * model["num_layers"] * model["num_kv_heads"] * model["head_dim"] * ctx * kv_bytes
    patches = tokens * vision.get("patches_per_token", 1)
    scores = vision.get("heads", 1) * patches ** 2 * 4
    acts = 8 * patches * vision.get("width", model["hidden_size"]) * 2
    peak = scores + acts
    embed = embed_bytes if preset.unified else 0
    total = (weight_bytes + kv + peak + embed) / GIB + preset.overhead_gib
    return Budget(preset.name, weight_bytes / GIB, kv / GIB, peak / GIB, embed / GIB, preset.overhead_gib,
                  total, preset.memory_gib, total <= preset.memory_gib, 3.5 * weight_bytes / GIB + preset.overhead_gib)
