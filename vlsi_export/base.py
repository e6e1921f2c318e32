"""The export ``Target`` protocol, and everything export targets share, written once.

A target is a class with a name, an ``Options`` dataclass (the CLI builds the target's flags
from its fields: names, defaults, choices and help live here and nowhere else), the packages
whose versions it records, and one step of its own, :meth:`Target.write`. :func:`export`
does the rest for every target: option checks, checkpoint loading, the architecture check,
the verbalizer check, the atomic folder, the copied tokenizer and processor files, the
source hash, the EOS ids and model block (from the architecture's spec), tool versions, the
manifest and the parity gate.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path

from vlsi.errors import ConfigError

COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "preprocessor_config.json", "chat_template.jinja", "chat_template.json", "vlsi.json")
"""Files of the checkpoint folder an artifact carries (those that exist)."""


def option(default, help: str, choices: tuple | None = None):
    """A target option: its default, its ``--help`` text and, optionally, its allowed values."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class CommonOptions:
    """Options every target takes."""

    verbalizers: bool = option(False, "Keep the verbalizer heads (onnx: one small graph per head, run only when "
                                      "a layer's logits are asked for; tensorrt: extra decoder outputs; gguf: a "
                                      "verbalizers.gguf sidecar).")
    overwrite: bool = option(False, "Replace an existing artifact folder.")
    validate: bool = option(True, "Check parity with the checkpoint before the artifact is written "
                                  "(--no-validate skips it; not recommended).")
    data: str | None = option(None, "Samples for the parity check (default: built-in synthetic questions).")
    parity_samples: int = option(16, "Samples the parity check decodes.")


def option_fields(options_cls) -> list:
    """The dataclass fields of a target's options, common ones last."""
    common = {f.name for f in fields(CommonOptions)}
    own = [f for f in fields(options_cls) if f.name not in common]
    return own + [f for f in fields(options_cls) if f.name in common]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class Written:
    """What a target's write step made."""

    precision: str
    """The text model's precision."""
    graphs: dict
    """Name -> :class:`vlsi.manifest.Graph`."""
    quantization: dict = field(default_factory=dict)
    decoder_split: object = None
    """ONNX: the :class:`vlsi.manifest.DecoderSplit` of the decoder graphs written."""


class Target:
    """Base class of export targets; register a subclass with :func:`register_target`."""

    name: str = ""
    Options: type = CommonOptions
    tools: tuple[str, ...] = ()
    """Packages whose versions the manifest records, besides vlsi, torch and transformers."""

    def options(self, **values):
        """The options dataclass from keyword values; unknown names name the target's options."""
        known = {f.name for f in fields(self.Options)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"the {self.name} target has no option {', '.join(flag(u) for u in unknown)}; "
                              f"its options: {', '.join(flag(k) for k in sorted(known))}")
        return self.Options(**values)

    def check(self, opts) -> None:
        """Refuse option values outside their choices (subclasses add their own rules)."""
        for f in fields(opts):
            choices = f.metadata.get("choices")
            if choices and getattr(opts, f.name) not in choices:
                raise ConfigError(f"{flag(f.name)} {getattr(opts, f.name)!r} is not one of {', '.join(choices)} "
                                  f"(target {self.name})")

    def __call__(self, model, out, **options) -> Path:
        """``get_target("onnx")(model, out, quant="int4")`` is :func:`export` for this target."""
        return export(model, out, target=self.name, **options)

    def write(self, ck, tmp: Path, opts, model_block: dict) -> Written:
        """Write the target's files into ``tmp`` (the checkpoint is ``ck``, loaded)."""
        raise NotImplementedError


_TARGETS: dict[str, Target] = {}


def register_target(cls):
    """Class decorator: make a target known under ``cls.name``."""
    _TARGETS[cls.name] = cls()
    return cls


def targets() -> list[str]:
    _load()
    return sorted(_TARGETS)


def get_target(name: str) -> Target:
    _load()
    if name not in _TARGETS:
        raise ConfigError(f"unknown export target {name!r}; available: {', '.join(sorted(_TARGETS))}")
    return _TARGETS[name]


def _load():
    from . import gguf_target, onnx_target, tensorrt_target  # noqa: F401  (registers)


def export(model, out, target: str = "onnx", **options) -> Path:
    """Export the checkpoint folder ``model`` to an artifact folder ``out`` for ``target``.

    The folder is written atomically and, unless ``validate=False``, only after it passed
    parity with the checkpoint: on failure no artifact is made, the parity report is left in
    ``<out>.parity-failed/`` and :class:`~vlsi_export.parity.ParityError` is raised."""
    from vlsi.archs import get_export, get_spec
    from vlsi.atomic import atomic_dir
    from vlsi.checkpoint import load_checkpoint
    from vlsi.manifest import Manifest, folder_hash, tool_versions, write_manifest

    tgt = get_target(target)
    opts = tgt.options(**options)
    tgt.check(opts)
    folder, out = Path(model), Path(out)
    ck = load_checkpoint(folder)
    get_export(ck.adapter.name, tgt.name)  # refuses an architecture the target does not take, with why
    if opts.verbalizers and ck.verbalizers is None:
        raise ConfigError(f"--verbalizers: {model} has no verbalizer heads (train them with the verbalize stage)")
    spec = get_spec(ck.adapter.name)
    model_block = spec.model_block(ck.model.config, ck.tokenizer)
    with atomic_dir(out, overwrite=opts.overwrite) as tmp:
        written = tgt.write(ck, tmp, opts, model_block)
        for name in COPIED:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, tmp / name)
        manifest = Manifest(
            target=tgt.name, precision=written.precision, model=model_block,
            eos_token_ids=spec.eos_ids(ck.tokenizer), graphs=written.graphs,
            verbalizers=list(ck.verbalizers.target_layers) if opts.verbalizers else [],
            decoder_split=written.decoder_split, quantization=written.quantization,
            source={"path": str(folder.resolve()), "sha256": folder_hash(folder)},
            tools=tool_versions(("vlsi", "torch", "transformers", *tgt.tools)),
        )
        write_manifest(tmp, manifest)
        if opts.validate:
            from .parity import gate

            gate(tmp, out, folder, manifest, opts.data, opts.parity_samples)
    return out
