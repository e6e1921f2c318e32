"""The checkpoint format: a normal ``save_pretrained`` folder plus VLsI's own files.

```
CKPT/
  config.json, generation_config.json, model.safetensors   # transformers loads these unchanged
  tokenizer.json, tokenizer_config.json                    # AutoTokenizer
  preprocessor_config.json                                 # AutoImageProcessor
  verbalizers.safetensors                                  # optional: one head per target layer
  vlsi.json                                                # format version, adapter, verbalizer config, provenance
```
Writes go to a temporary folder renamed into place, so a crash never leaves a folder that
loads half-written. Loading checks key sets and shapes and names the file at fault.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_dir
from .errors import CheckpointError

FORMAT_VERSION = 1
VERBALIZERS_FILE = "verbalizers.safetensors"
META_FILE = "vlsi.json"


@dataclass
class Checkpoint:
    model: object
    tokenizer: object
    """``tokenizers.Tokenizer`` (fast, transformers-free)."""
    image_processor: object
    verbalizers: object | None
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def adapter(self):
        from .archs import get_adapter

        return get_adapter(self.model)


def save_checkpoint(out_dir, model, tokenizer, image_processor, verbalizers=None, provenance=None,
                    overwrite: bool = True, extra_files: dict | None = None) -> Path:
    """Write a checkpoint folder atomically; returns its path.

    ``extra_files`` maps relative names to files copied in (training metrics, plots)."""
    import shutil

    from safetensors.torch import save_file

    from .archs import get_adapter
    from .chat import chat_template
    from .tokenizer import save_tokenizer

    adapter = get_adapter(model)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        template = chat_template(adapter.spec.image_marker)  # the layout vlsi trains with, whatever came in
        if hasattr(tokenizer, "save_pretrained"):
            before, tokenizer.chat_template = getattr(tokenizer, "chat_template", None), template
            try:
                tokenizer.save_pretrained(tmp)
            finally:
                tokenizer.chat_template = before
        else:
            save_tokenizer(tokenizer, tmp, image_marker=adapter.spec.image_marker)
        image_processor.save_pretrained(tmp)
        meta = {"format_version": FORMAT_VERSION, "adapter": adapter.name, "verbalizers": None,
                "provenance": provenance or {}}
        if verbalizers is not None:
            state = {k: v.detach().contiguous().cpu() for k, v in verbalizers.state_dict().items()}
            save_file(state, str(tmp / VERBALIZERS_FILE), metadata={"format": "pt"})
            meta["verbalizers"] = verbalizers.cfg.to_dict()
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for name, src in (extra_files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / name)
    return out_dir


def read_meta(folder) -> dict:
    folder = Path(folder)
    path = folder / META_FILE
    if not path.is_file():
        return {"format_version": FORMAT_VERSION, "adapter": None, "verbalizers": None, "provenance": {}}
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is damaged") from None
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {meta['format_version']}, newer than this vlsi reads "
            f"({FORMAT_VERSION}); upgrade vlsi"
        )
    return meta


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder / 'config.json'} is missing: {folder} is not a saved model folder")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise CheckpointError(f"{folder} has no weight files (model.safetensors)")


def _safetensors_keys(path: Path) -> dict[str, tuple]:
    """Key -> shape from a safetensors header, or a CheckpointError naming the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path} is damaged or truncated ({type(e).__name__}: {e}); re-save or re-download it") from None


def load_checkpoint(folder, device="cpu", dtype=None, with_verbalizers: bool = True) -> Checkpoint:
    """Load model, tokenizer, image processor and verbalizers, checking every file."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from .archs import get_adapter
    from .tokenizer import load_fast_tokenizer
    from .verbalizer import VerbalizerConfig, Verbalizers

    folder = Path(folder)
    _check_folder(folder)
    meta = read_meta(folder)
    config = AutoConfig.from_pretrained(str(folder))
    adapter = get_adapter(config)
    weight_files = sorted(folder.glob("model*.safetensors"))
    for wf in weight_files:
        _safetensors_keys(wf)  # a truncated file fails here, named
    try:
        model, info = adapter.model_class().from_pretrained(
            str(folder), dtype=dtype or torch.float32, output_loading_info=True
        )
    except Exception as e:
        raise CheckpointError(f"{folder}: transformers could not load the model ({type(e).__name__}: {e})") from e
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise CheckpointError(f"{folder}/model.safetensors does not match {config.model_type}'s layout: {problems}")
    model.to(device).eval()
    tokenizer = load_fast_tokenizer(folder)
    if not (folder / "preprocessor_config.json").is_file():
        raise CheckpointError(f"{folder / 'preprocessor_config.json'} is missing: save the image processor with the model")
    image_processor = adapter.load_image_processor(folder)

    verbalizers = None
    vpath = folder / VERBALIZERS_FILE
    if with_verbalizers and meta.get("verbalizers"):
        if not vpath.is_file():
            raise CheckpointError(f"{vpath} is missing but {folder / META_FILE} lists verbalizers")
        shapes = _safetensors_keys(vpath)
        verbalizers = Verbalizers.for_model(model, VerbalizerConfig.from_dict(meta["verbalizers"]))
        want = {k: tuple(v.shape) for k, v in verbalizers.state_dict().items()}
        if set(want) != set(shapes):
            raise CheckpointError(
                f"{vpath} keys do not match the verbalizer config in {META_FILE}: "
                f"missing {sorted(set(want) - set(shapes))[:5]}, unexpected {sorted(set(shapes) - set(want))[:5]}"
            )
        wrong = {k: (shapes[k], want[k]) for k in want if shapes[k] != want[k]}
        if wrong:
            raise CheckpointError(f"{vpath} has tensors of the wrong shape (found, expected): {wrong}")
        verbalizers.load_state_dict(load_file(str(vpath), device=str(device)))
        verbalizers.eval()
    return Checkpoint(model, tokenizer, image_processor, verbalizers, meta, folder)
