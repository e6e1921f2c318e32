"""The artifact manifest: the typed contract between an export and the runtimes that load it.

``manifest.json`` is a :class:`Manifest`: the target, the text model's precision (top level,
for every target), the model block (the architecture's spec writes it, runtimes read it
back), the end-of-turn ids, every graph or file with its precision and input/output names
(runtimes read graph outputs by these names, never by position), the verbalizers kept, how an
ONNX decoder is split into graphs (:class:`DecoderSplit`), the source checkpoint's hash, tool
versions, the parity report and every file with its sha256.
:func:`load_manifest` checks the format version and, with ``verify``, that every listed file
exists with its recorded size and hash. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from .errors import VLsIError

MANIFEST = "manifest.json"
FORMAT_VERSION = 3
"""2: typed manifest (top-level precision, ``graphs`` for every target, I/O names). 3: ONNX
decoders split at layer boundaries (``decoder_split``), heads as separate graphs. Version 2
artifacts are still read (an ONNX one has one ``decoder`` graph computing every kept head on
every step); version 1 artifacts (vlsi 0.1 before the architecture packages) must be exported
again."""
OLDEST_READ = 2


class ArtifactError(VLsIError):
    """An artifact folder is incomplete, damaged, or from a newer vlsi."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def folder_hash(folder: str | Path, patterns=("*.json", "*.safetensors", "*.jinja")) -> str:
    """A stable hash of a checkpoint folder's weights and configs (names and contents)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for pat in patterns:
        for p in sorted(folder.glob(pat)):
            h.update(p.name.encode())
            h.update(sha256_file(p).encode())
    return h.hexdigest()


# reports about an artifact, rewritten by every `vlsi validate`: not part of its hashed payload
REPORTS = frozenset({"parity.json", "parity.md", "parity.png"})


def tool_versions(packages) -> dict[str, str]:
    """Installed versions of ``packages`` (those not installed are left out), for manifests."""
    import importlib.metadata as md

    out = {}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


# built on the device after export (TensorRT engines, with their own build record): not part of
# the exported payload either
BUILT = "engines"


def file_entries(folder: Path) -> dict[str, dict]:
    return {
        str(p.relative_to(folder)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST and p.name not in REPORTS and p.relative_to(folder).parts[0] != BUILT
    }


@dataclass
class Graph:
    """One file of an artifact that a runtime loads: an ONNX graph, a GGUF file, an engine."""

    file: str
    precision: str
    """Weights' precision as written (fp32, fp16, int8, int4; f16, q4_k_m, ...)."""
    inputs: list[str] = field(default_factory=list)
    """Input names, in the graph's order (empty for files without named inputs, e.g. GGUF)."""
    outputs: list[str] = field(default_factory=list)
    """Output names; runtimes look outputs up by these."""
    details: dict = field(default_factory=dict)
    """Target-specific facts: signature dtypes and shapes, tensor types written, fallbacks."""


@dataclass
class Segment:
    """Consecutive decoder layers in one graph, with their KV cache."""

    graph: str
    """Key of the graph in :attr:`Manifest.graphs`."""
    first_layer: int
    """First layer it runs (1-based)."""
    last_layer: int
    """Last layer it runs (1-based, inclusive)."""
    hidden_in: str
    """Input name of the hidden state it starts from: ``inputs_embeds`` for the first segment,
    else the previous segment's ``hidden_out``."""
    hidden_out: str
    """Output name of the state after ``last_layer`` (``hidden_<layer>``), or for the last
    segment, ``final_hidden``: after the final norm, what the LM head reads."""


@dataclass
class Head:
    """A head on a hidden state: the model's LM head, or a verbalizer's own part (its FFN and norm)."""

    graph: str
    """Key of the graph in :attr:`Manifest.graphs`."""
    input: str
    output: str
    layer: int | None = None
    """The decoder layer whose output a verbalizer reads (``None`` for the LM head)."""


@dataclass
class DecoderSplit:
    """An ONNX decoder as graphs, no weight in two of them: segments chained by their hidden
    states (plain decoding runs these and the LM head, nothing else), the LM head once, and one
    graph per kept verbalizer mapping the captured state of its layer to what the LM head reads,
    run only when that layer's logits are asked for. Every graph takes ``(B, T, ...)`` and
    returns a row per position given."""

    segments: list[Segment]
    lm_head: Head
    verbalizers: list[Head] = field(default_factory=list)
    row_wise_rows: int = 0
    """Passes of 2 up to this many positions attend row by row in every segment
    (:mod:`vlsi_export.rowwise`): bit for bit what the positions give fed one at a time, which
    exact speculative verification needs. 0 in artifacts made before it."""
    draft_head: Head | None = None
    """A reduced-vocabulary LM head for drafting (``--draft-vocab``): the LM head's rows of
    :attr:`draft_vocab` only, on what a verbalizer's own part returns. Verification uses the
    full head, so drafting with it changes the speed, never the tokens."""
    draft_vocab: list[int] = field(default_factory=list)
    """Token ids of the draft head's rows, in order."""

    @property
    def split_layers(self) -> list[int]:
        """The layers after which a hidden state leaves a graph (every segment's last but the final one)."""
        return [s.last_layer for s in self.segments[:-1]]

    @classmethod
    def from_dict(cls, d: dict) -> DecoderSplit:
        return cls(segments=[Segment(**s) for s in d["segments"]], lm_head=Head(**d["lm_head"]),
                   verbalizers=[Head(**h) for h in d.get("verbalizers", [])],
                   row_wise_rows=int(d.get("row_wise_rows", 0)),
                   draft_head=Head(**d["draft_head"]) if d.get("draft_head") else None,
                   draft_vocab=[int(t) for t in d.get("draft_vocab", [])])


@dataclass
class Manifest:
    target: str
    """onnx, gguf or tensorrt."""
    precision: str
    """The text model's precision; each graph's own is in ``graphs``."""
    model: dict
    """The architecture spec's model block (``arch``, sizes, image token id, position axes...)."""
    eos_token_ids: list[int]
    graphs: dict[str, Graph]
    verbalizers: list[int] = field(default_factory=list)
    """Target layers whose verbalizer heads are kept."""
    decoder_split: DecoderSplit | None = None
    """ONNX: how the decoder is split into graphs (format 3). ``None``: a GGUF or TensorRT
    artifact, or an ONNX one of format 2 (one ``decoder`` graph with every head as an output)."""
    quantization: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    tools: dict = field(default_factory=dict)
    parity: dict | None = None
    device_parity: dict = field(default_factory=dict)
    """Engine folder -> parity of the fixtures run through those engines on the device
    (TensorRT; ``vlsi build`` writes it). ``parity`` is the export's, on the CPU."""
    files: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def arch(self) -> str:
        return self.model["arch"]

    def graph(self, name: str) -> Graph:
        if name not in self.graphs:
            raise ArtifactError(f"the {self.target} artifact has no {name!r} graph (it has {', '.join(self.graphs)})")
        return self.graphs[name]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = MANIFEST) -> Manifest:
        known = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise ArtifactError(f"{where} lacks {', '.join(missing)}; re-export the artifact")
        try:
            graphs = {k: Graph(**g) for k, g in d["graphs"].items()}
        except TypeError as e:
            raise ArtifactError(f"{where}: a graph entry is malformed ({e}); re-export the artifact") from None
        split = d.get("decoder_split")
        if split is not None:
            try:
                split = DecoderSplit.from_dict(split)
            except (TypeError, KeyError) as e:
                raise ArtifactError(f"{where}: decoder_split is malformed ({e!r}); re-export the artifact") from None
            heads = (split.lm_head, *split.verbalizers, *([split.draft_head] if split.draft_head else []))
            named = [s.graph for s in split.segments] + [h.graph for h in heads]
            unknown = [g for g in named if g not in graphs]
            if unknown:
                raise ArtifactError(f"{where}: decoder_split names graphs {unknown} that are not in graphs; "
                                    "re-export the artifact")
        return cls(**{**{k: v for k, v in d.items() if k in known}, "graphs": graphs, "decoder_split": split})


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """Write ``manifest`` into ``folder`` with the current file list and hashes."""
    manifest.files = file_entries(folder)
    manifest.format_version = FORMAT_VERSION
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return path


def load_manifest(folder: str | Path, verify: bool = True) -> Manifest:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: {folder} is not a vlsi export (run `vlsi export` to make one)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e})") from None
    version = d.get("format_version", 0) if isinstance(d, dict) else 0
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{path} has format_version {version}, newer than this vlsi reads "
                            f"({FORMAT_VERSION}); upgrade vlsi")
    if version < OLDEST_READ:
        raise ArtifactError(f"{path} has format_version {version}, from an older vlsi whose manifests runtimes "
                            f"no longer read; export the checkpoint again (`vlsi export ...`)")
    m = Manifest.from_dict(d, str(path))
    if verify:
        for name, entry in m.files.items():
            f = folder / name
            if not f.is_file():
                raise ArtifactError(f"{f} is listed in {MANIFEST} but missing; re-export the artifact")
            if f.stat().st_size != entry["bytes"]:
                raise ArtifactError(f"{f} is {f.stat().st_size} bytes, the manifest says {entry['bytes']}: "
                                    "truncated or replaced; re-export the artifact")
            if sha256_file(f) != entry["sha256"]:
                raise ArtifactError(f"{f} does not match its sha256 in {MANIFEST}: damaged or replaced")
    return m
