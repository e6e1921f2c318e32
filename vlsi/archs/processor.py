"""What the architectures' torch-free image specs share: reading ``preprocessor_config.json``
and checking the pixel settings every transformers image processor has. Numpy and Pillow only."""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image

from vlsi.errors import ConfigError

#: OpenAI CLIP's normalisation, the default of both Qwen2-VL's and LLaVA-OneVision's processors.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def read_preprocessor_config(path_or_dict) -> tuple[dict, str]:
    """``(config, where)`` from a ``preprocessor_config.json``, the folder holding it, or its dict;
    ``where`` names it in messages."""
    if isinstance(path_or_dict, dict):
        return path_or_dict, "<preprocessor config dict>"
    if not isinstance(path_or_dict, (str, os.PathLike)):
        raise ConfigError(f"from_preprocessor_config takes a path or a dict, got {type(path_or_dict).__name__}")
    p = Path(path_or_dict).expanduser()
    if p.is_dir():
        p = p / "preprocessor_config.json"
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p} not found: pass a preprocessor_config.json or the model folder holding it") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{p}: cannot read it as JSON: {type(e).__name__}: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{p}: expected a JSON object at the top level, got {type(cfg).__name__}")
    return cfg, str(p)


def check_pixel_settings(spec, flags: tuple[str, ...]) -> None:
    """Check and normalise, on a frozen dataclass ``spec``, the settings every processor has:
    a non-zero ``image_std``, a numeric ``rescale_factor``, a Pillow ``resample`` filter and the
    boolean ``flags`` (``do_resize``, ...). ``image_mean``/``image_std`` are already tuples."""
    if any(s == 0 for s in spec.image_std):
        raise ConfigError(f"image spec: image_std has a zero entry {spec.image_std}; it is a divisor")
    if isinstance(spec.rescale_factor, bool) or not isinstance(spec.rescale_factor, (int, float)):
        raise ConfigError(f"image spec: rescale_factor must be a number, got {spec.rescale_factor!r}")
    object.__setattr__(spec, "rescale_factor", float(spec.rescale_factor))
    try:
        resample = int(spec.resample)
        Image.Resampling(resample)
    except (TypeError, ValueError):
        allowed = ", ".join(f"{r.value} ({r.name.lower()})" for r in Image.Resampling)
        raise ConfigError(
            f"image spec: resample must be a Pillow filter number, one of {allowed}; got {spec.resample!r}"
        ) from None
    object.__setattr__(spec, "resample", resample)
    for name in flags:
        object.__setattr__(spec, name, bool(getattr(spec, name)))
