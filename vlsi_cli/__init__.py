"""The ``vlsi`` command line: the composition root, the one package that may import every
layer (core, training, export, runtimes, apps). Each command is a thin wrapper over one
library function; ``COMMANDS`` lists them, and a test keeps it in sync with the click tree.
``vlsi export``'s flags are built from the export targets' option dataclasses."""

from __future__ import annotations

import json
import sys

import click

from vlsi.data.synth import SynthConfig
from vlsi.errors import VLsIError

# command path -> "module:function" it wraps
COMMANDS = {
    "data synth": "vlsi.data.synth:generate",
    "data answers": "vlsi_train.teacher_labels:label_with_teacher",
    "train run": "vlsi_train.pipeline:run",
    "quickstart": "vlsi_train.quickstart:quickstart",
    "train ablate": "vlsi_train.ablate:ablate",
    "train bench": "vlsi_train.bench:bench",
    "export": "vlsi_export.base:export",
    "validate": "vlsi_export.parity:validate",
    "build": "vlsi_export.trt_build:build",
    "bench": "vlsi_runtimes.bench:bench",
    "tiny": "vlsi.tiny:save_tiny",
    "eval": "vlsi.eval:evaluate",
    "serve": "vlsi_apps.server:serve",
    "demo": "vlsi_cli.demo:demo",
}

# a missing top-level module -> the extra that brings it
EXTRAS = {"torch": "train", "transformers": "train", "peft": "train", "matplotlib": "train", "pyarrow": "train",
          "onnx": "onnx", "onnxruntime": "onnx", "onnxscript": "onnx", "gguf": "gguf", "llama_cpp": "gguf",
          "starlette": "app", "uvicorn": "app", "tensorrt": "tensorrt"}


def missing_extra(e: ModuleNotFoundError) -> str | None:
    """One line saying which extra to install for a missing module, or None if it is not ours."""
    top = (e.name or "").split(".")[0]
    if top not in EXTRAS:
        return None
    return f"this command needs {top}, which is not installed: pip install 'vlsi[{EXTRAS[top]}]'"


class _Group(click.Group):
    """Shows VLsIError, and a missing optional dependency, as a one-line message instead of a
    traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except VLsIError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except ModuleNotFoundError as e:
            line = missing_extra(e)
            if line is None:
                raise
            click.echo(f"error: {line}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vlsi")
def main():
    """vlsi: distil small vision-language models with VLsI and take them to the edge."""


@main.group(cls=_Group)
def data():
    """Make and inspect datasets."""


@data.command("synth")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to create (must not exist, or be empty, unless --overwrite).")
@click.option("--n", "n", default=SynthConfig.n, show_default=True, help="Training samples; val/test/compositional get n/10 each unless --n-eval.")
@click.option("--seed", default=SynthConfig.seed, show_default=True, help="Same seed and options give the same bytes.")
@click.option("--n-eval", type=int, default=None, help="Samples in each of val, test and compositional.")
@click.option("--n-pool", default=SynthConfig.n_pool, show_default=True,
              help="Also a 'pool' split of this many unlabelled-use images, none equal to a train image "
                   "(for teacher-labelled distillation); the other splits are the same bytes whatever it is.")
@click.option("--image-size", default=SynthConfig.image_size, show_default=True, help="Square image side in pixels (a multiple of 28 for Qwen2-VL).")
@click.option("--grid", default=SynthConfig.grid, show_default=True, help="Objects sit on a grid x grid layout.")
@click.option("--min-objects", default=SynthConfig.min_objects, show_default=True, help="Fewest objects per image.")
@click.option("--max-objects", default=SynthConfig.max_objects, show_default=True, help="Most objects per image.")
@click.option("--families", default=None, help="Comma-separated question families (default: all); see --list-families.")
@click.option("--reasoning/--short", default=False, show_default=True, help="Answers with a one-sentence reason before 'Answer: X.'.")
@click.option("--dots", is_flag=True, help="Draw 0-3 dots inside objects (and ask count questions about them).")
@click.option("--qa-per-image", default=SynthConfig.qa_per_image, show_default=True, help="Question/answer turns per image (multi-turn records).")
@click.option("--background", default="grey", show_default=True, help="Background: grey, white, black or #rrggbb.")
@click.option("--no-mc", is_flag=True, help="Skip the multiple-choice TSV files.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--list-families", is_flag=True, help="Print the question families and exit.")
def data_synth(out, n, seed, n_eval, n_pool, image_size, grid, min_objects, max_objects, families, reasoning, dots,
               qa_per_image, background, no_mc, overwrite, list_families):
    """Generate the synthetic visual-QA dataset (LLaVA JSON + PNGs + VLMEvalKit TSV)."""
    from vlsi.data.synth import FAMILIES, SynthConfig, generate

    if list_families:
        click.echo("\n".join(FAMILIES))
        return
    fams = tuple(f.strip() for f in families.split(",")) if families else None
    cfg = SynthConfig(n=n, seed=seed, n_eval=n_eval, n_pool=n_pool, image_size=image_size, grid=grid, min_objects=min_objects,
                      max_objects=max_objects, families=fams, reasoning=reasoning, dots=dots,
                      qa_per_image=qa_per_image, background=background, mc=not no_mc)
    stats = generate(out, cfg, overwrite=overwrite)
    click.echo(json.dumps(stats.as_dict(), indent=2, default=str))


@data.command("answers")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Checkpoint whose greedy answers replace the references.")
@click.option("--data", "data_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="LLaVA .json with the images and questions.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="LLaVA .json to write.")
@click.option("--limit", type=int, default=None, help="Answer only the first N records.")
@click.option("--max-new-tokens", default=64, show_default=True, help="Longest answer.")
def data_answers(model_dir, data_path, out, limit, max_new_tokens):
    """A copy of a dataset answered by a model itself (greedy): a teacher's answers for
    sequence-level distillation, or a model's own for fitting drafter heads
    (``verbalizer.fit=final``)."""
    from vlsi_train.teacher_labels import label_with_teacher

    path = label_with_teacher(model_dir, data_path, out, max_new_tokens=max_new_tokens, limit=limit)
    click.echo(f"wrote {path}")


@main.command("tiny")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Checkpoint folder to write.")
@click.option("--arch", default="qwen2_vl", show_default=True, help="Architecture adapter (qwen2_vl, qwen2_5_vl, llava_onevision).")
@click.option("--size", default="student", show_default=True, help="teacher, student or k256 (see vlsi/tiny.py).")
@click.option("--seed", default=0, show_default=True, help="Initialisation seed.")
@click.option("--verbalizers", "targets", default=None, help="Attach untrained verbalizer heads at these layers: '1::2' (every 2nd from 1) or '2,4'.")
@click.option("--verbalizer-arch", default="verb_ffn", show_default=True, help="verb_ffn, ffn, mlp or decoder_block.")
@click.option("--overwrite", is_flag=True, help="Replace an existing checkpoint folder.")
def tiny_cmd(out, arch, size, seed, targets, verbalizer_arch, overwrite):
    """Build a randomly initialised tiny model (shared synthetic tokenizer) as a checkpoint."""
    from vlsi.tiny import save_tiny

    path = save_tiny(out, arch=arch, size=size, seed=seed, verbalizer_layers=targets, verbalizer_arch=verbalizer_arch,
                     overwrite=overwrite)
    click.echo(f"wrote {path}")


class _DefaultGroup(_Group):
    """A group whose default subcommand is ``run``: ``vlsi train --config X`` means ``vlsi train run --config X``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        elif not args:
            args = ["run"]
        return super().parse_args(ctx, args)


@main.group("train", cls=_DefaultGroup)
def train_group():
    """Train with VLsI: `vlsi train --config FILE.yaml [key=value ...]` (see `vlsi train run --help`)."""


@train_group.command("run")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML file: one stage's keys, or defaults plus a `pipeline:` list of stages.")
@click.option("--resume", is_flag=True, help="Continue from the last saved state of each stage (<out>.train/state).")
@click.argument("overrides", nargs=-1)
def train_run(config_path, resume, overrides):
    """Run one training stage or a pipeline. OVERRIDES are key=value (dotted for nested keys,
    e.g. interact.matching=random steps=500)."""
    from vlsi_train.pipeline import run

    for path in run(config_path, list(overrides), resume=resume):
        click.echo(f"wrote {path}")


_jobs_option = click.option(
    "--jobs", type=click.IntRange(min=1), default=None,
    help="Training and evaluation processes run side by side, one torch thread each (default: 2 with >= 2 CPU cores).")


@train_group.command("ablate")
@click.option("--grid", required=True, type=click.Path(exists=True, dir_okay=False),
              help="YAML with `variants: [{name, interact: {...}}]` (see configs/ablation_table4.yaml).")
@click.option("--out", default="runs/ablation", show_default=True, type=click.Path(file_okay=False),
              help="Run folder; the quickstart's teacher/student/pool are made here once or reused.")
@click.option("--seeds", default=3, show_default=True, help="Seeds per variant (mean and spread reported).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_jobs_option
def train_ablate(grid, out, seeds, quiet, jobs):
    """Run the Table 4 ablation variants and write a Markdown table (OUT/ablation.md)."""
    from vlsi_train.ablate import ablate

    click.echo(ablate(grid, out, seeds=seeds, progress=not quiet, jobs=jobs)["table"])


@train_group.command("bench")
@click.option("--teacher", required=True, type=click.Path(exists=True, file_okay=False), help="Teacher checkpoint with verbalizers.")
@click.option("--student", required=True, type=click.Path(exists=True, file_okay=False), help="Student checkpoint with verbalizers.")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False), help="Training data (the first batch is used).")
@click.option("--steps", default=10, show_default=True, help="Timed steps per mode (after 2 warm-up steps).")
@click.option("--batch-size", default=16, show_default=True, help="Batch size.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the rows as JSON.")
def train_bench(teacher, student, data, steps, batch_size, device, out):
    """Time per step and peak memory of SFT, final-layer KD and interact on the same batch."""
    from vlsi_train.bench import bench, format_rows

    rows = bench(teacher, student, data, steps=steps, batch_size=batch_size, device=device)
    click.echo(format_rows(rows))
    if out:
        from vlsi.atomic import atomic_write_text

        atomic_write_text(out, json.dumps(rows, indent=2) + "\n")


@main.command("quickstart")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (re-running continues where it stopped).")
@click.option("--seed", default=0, show_default=True, help="First seed.")
@click.option("--seeds", default=1, show_default=True, help="Number of seeds (mean and spread reported).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_jobs_option
def quickstart_cmd(out, seed, seeds, quiet, jobs):
    """The main job on the built-in synthetic default: data, teacher, student, VLsI and the
    baselines with equal compute, evaluation; writes OUT/report.json and prints a table."""
    from vlsi_train.quickstart import quickstart, table

    report = quickstart(out, seed=seed, seeds=seeds, progress=not quiet, jobs=jobs)
    click.echo(table(report))
    click.echo(f"({report['seconds']:.0f} s; report: {out}/report.json)")


def _export_options(f):
    """``vlsi export``'s flags: every export target's option fields, each flag once. A flag
    shared by targets with different defaults shows each; unset flags take the target's own."""
    import dataclasses

    from vlsi_export.base import CommonOptions, flag, get_target, option_fields, targets

    seen: dict[str, list] = {}
    for name in targets():
        for fld in option_fields(get_target(name).Options):
            seen.setdefault(fld.name, []).append((name, fld))
    common = {fld.name for fld in dataclasses.fields(CommonOptions)}
    for key, uses in reversed(list(seen.items())):
        fld = uses[0][1]
        helps = {fl.metadata["help"] for _, fl in uses}
        helptext = fld.metadata["help"] if len(helps) == 1 else " ".join(
            f"{t}: {fl.metadata['help']}" for t, fl in uses)
        if key not in common:
            where = ", ".join(f"{t}: {fl.default}" for t, fl in uses)
            choices = "; ".join(f"{t}: {', '.join(map(str, fl.metadata['choices']))}" for t, fl in uses
                                if fl.metadata.get("choices"))
            helptext = f"[{where}] {helptext}" + (f" Choices: {choices}." if choices else "")
        elif fld.default not in (None, False):
            helptext = f"{helptext} [default: {fld.default}]"
        if fld.type in ("bool", bool):
            f = click.option(f"{flag(key)}/--no-{flag(key)[2:]}", key, default=None, help=helptext)(f)
        else:
            kind = int if fld.type in ("int", int, "int | None") else str
            f = click.option(flag(key), key, type=kind, default=None, help=helptext)(f)
    return f


@main.command("export", context_settings={"max_content_width": 110})
@click.option("--model", required=True, type=click.Path(exists=True, file_okay=False), help="Checkpoint folder.")
@click.option("--target", default="onnx", show_default=True, help="Export target: onnx, or gguf (llama.cpp).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Artifact folder to create.")
@_export_options
def export_cmd(model, target, out, **options):
    """Export a checkpoint for an edge runtime; the result must pass parity to be written.
    Flags a target does not take are refused; unset flags take the target's default."""
    from vlsi_export.base import export

    given = {k: v for k, v in options.items() if v is not None}  # options() refuses another target's flags
    click.echo(f"wrote {export(model, out, target=target, **given)}")


@main.command("validate")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--reference", required=True, type=click.Path(exists=True, file_okay=False), help="The checkpoint it came from.")
@click.option("--data", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Samples (default: built-in synthetic questions).")
@click.option("--samples", default=16, show_default=True, help="How many samples.")
def validate_cmd(artifact, reference, data, samples):
    """Check an artifact's parity with its checkpoint; exits non-zero when a metric fails."""
    from vlsi_export.parity import validate

    report = validate(artifact, reference, data=data, n=samples, raise_on_fail=False)
    click.echo(report.markdown())
    if not report.passed:
        sys.exit(1)


@main.command("build")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--preset", default=None, help="Device preset whose caps and profiles to build (orin-nano, orin-agx, "
                                             "desktop; default: the one the artifact was exported for).")
@click.option("--max-context", type=int, default=None, help="Context length the engines take (default: the preset's).")
@click.option("--max-image-tokens", type=int, default=None, help="Image tokens one prompt may take (default: the preset's).")
@click.option("--opt-level", default=3, show_default=True, help="TensorRT's builder optimisation level, 0-5 (higher: "
                                                                "slower builds, sometimes faster engines).")
@click.option("--workspace-gib", type=float, default=None, help="TensorRT's workspace limit in GiB (default: TensorRT's own).")
def build_cmd(artifact, preset, max_context, max_image_tokens, opt_level, workspace_gib):
    """Build TensorRT engines for this GPU from a `--target tensorrt` artifact (on the device),
    then run its fixtures through them and record the device parity."""
    from vlsi_export.trt_build import build

    path = build(artifact, preset=preset, max_context=max_context, max_image_tokens=max_image_tokens,
                 opt_level=opt_level, workspace_gib=workspace_gib)
    click.echo(f"wrote {path}")


@main.command("bench")
@click.argument("artifacts", nargs=-1, type=click.Path(exists=True, file_okay=False))
@click.option("--reference", required=True, type=click.Path(exists=True, file_okay=False),
              help="The checkpoint (timed as PyTorch eager fp32, the baseline of every ratio).")
@click.option("--prompt-tokens", default=64, show_default=True, help="Approximate prompt length.")
@click.option("--new-tokens", default=64, show_default=True, help="Tokens decoded per run (end-of-turn ignored).")
@click.option("--runs", default=5, show_default=True, help="Timed runs per backend (medians reported).")
@click.option("--threads", default=0, show_default=True, help="CPU threads per backend (0: the runtime's default).")
@click.option("--image-size", default=224, show_default=True,
              help="Side in pixels of the image of the follow-up benchmark (cold vs reused time to first token).")
@click.option("--rounds", default=1, show_default=True, type=click.IntRange(min=1),
              help="Measure the artifacts this many times, alternating (A, B, A, B, ...), with each one's decode "
                   "rate as a ratio to the first artifact's in the same round.")
@click.option("--speculative", "speculative", default=None, metavar="LAYER:TOKENS[:MIN_P]",
              help="Also time self-speculative decoding (drafting with layer LAYER's verbalizer, up to TOKENS per "
                   "cycle, stopping below MIN_P) against plain decoding of each ONNX and GGUF artifact, "
                   "alternating, with the cost model's prediction; GGUF artifacts (exported with --draft-layer "
                   "LAYER) also with the draft model's own head and llama.cpp's own speculative decoding.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the rows as JSON.")
def bench_cmd(artifacts, reference, prompt_tokens, new_tokens, runs, threads, image_size, rounds, speculative, out):
    """Time to first token, decode tokens/s, vision latency and peak RSS per artifact vs PyTorch."""
    from vlsi_runtimes.bench import bench, format_rows

    spec = _parse_speculative(speculative) if speculative else None
    rows = bench(list(artifacts), reference, prompt_tokens, new_tokens, runs, threads, image_size, rounds)
    click.echo(format_rows(rows))
    if spec is not None:
        from vlsi.manifest import load_manifest
        from vlsi_runtimes.bench import _run_speculative, format_speculative

        drafting = [a for a in artifacts if load_manifest(a, verify=False).target in ("onnx", "gguf")]
        if not drafting:
            raise click.UsageError("--speculative times ONNX and GGUF artifacts; none was given")
        spec_rows = [row for a in drafting for row in _run_speculative(str(a), spec, new_tokens, runs, threads)]
        click.echo("\nSpeculative decoding against plain decoding of the same artifact, alternating on "
                   "the same prompts:\n\n" + format_speculative(spec_rows))
        rows = [*rows, {"speculative": spec_rows}]
    if out:
        from vlsi.atomic import atomic_write_text

        atomic_write_text(out, json.dumps(rows, indent=2) + "\n")


def _parse_speculative(text: str) -> dict:
    """``LAYER:TOKENS[:MIN_P]`` -> the runtime's speculative mapping."""
    parts = text.split(":")
    try:
        if not 2 <= len(parts) <= 3:
            raise ValueError
        spec = {"layer": int(parts[0]), "tokens": int(parts[1])}
        if len(parts) == 3:
            spec["min_p"] = float(parts[2])
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected LAYER:TOKENS or LAYER:TOKENS:MIN_P, e.g. 6:4 or 6:4:0.5",
                                 param_hint="--speculative") from None
    from vlsi_runtimes import Speculative

    try:
        Speculative.of(spec)
    except Exception as e:
        raise click.BadParameter(str(e), param_hint="--speculative") from None
    return spec


@main.command("eval")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False), help="Checkpoint folder.")
@click.option("--data", "data_path", required=True, type=click.Path(exists=True, dir_okay=False), help="LLaVA .json, messages .jsonl/.parquet or VLMEvalKit .tsv.")
@click.option("--verbalize", is_flag=True, help="Also decode with each verbalizer head and report per-layer accuracy (+ PNG chart).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the report JSON here (chart beside it).")
@click.option("--batch-size", default=16, show_default=True, help="Prompts decoded together.")
@click.option("--max-new-tokens", type=int, default=None, help="Decode limit (default: longest reference answer + 8).")
@click.option("--limit", type=int, default=None, help="Evaluate only the first N records.")
@click.option("--device", default="cpu", show_default=True, help="torch device.")
def eval_cmd(model_dir, data_path, verbalize, out, batch_size, max_new_tokens, limit, device):
    """Greedy-decode a dataset and report accuracy (per category, and per layer with --verbalize)."""
    from vlsi.eval import evaluate

    rep = evaluate(model_dir, data_path, verbalize=verbalize, batch_size=batch_size, max_new_tokens=max_new_tokens,
                   limit=limit, out=out, device=device)
    click.echo(f"accuracy {rep['accuracy']:.3f} on {rep['n']} items")
    for cat, acc in rep["per_category"].items():
        click.echo(f"  {cat:<14} {acc:.3f}")
    for layer, acc in rep.get("per_layer_accuracy", {}).items():
        click.echo(f"  layer {layer:>3}     {acc:.3f}")


def _limits_options(f):
    for opt in reversed([
        click.option("--max-tokens", default=512, show_default=True, help="Cap on a request's max_tokens (and its default)."),
        click.option("--max-queue", default=8, show_default=True, help="Requests that may wait while one runs; more get 429."),
        click.option("--max-image-pixels", default=16_000_000, show_default=True, help="Largest decoded image, in pixels."),
        click.option("--max-body-mb", default=16, show_default=True, help="Largest request body, in MiB."),
        click.option("--max-images", default=4, show_default=True, help="Images across a request's whole conversation."),
        click.option("--max-prompt-tokens", default=8192, show_default=True,
                     help="Tokens of a request's rendered conversation, images included."),
        click.option("--max-image-tokens", default=4096, show_default=True,
                     help="Image tokens across a request's images (the vision encoder's cost)."),
    ]):
        f = opt(f)
    return f


def _limits(max_tokens, max_queue, max_image_pixels, max_body_mb, max_images, max_prompt_tokens, max_image_tokens):
    from vlsi_apps.server import Limits

    return Limits(max_tokens=max_tokens, max_queue=max_queue, max_image_pixels=max_image_pixels,
                  max_body_bytes=max_body_mb * 1024 * 1024, max_images=max_images, max_prompt_tokens=max_prompt_tokens,
                  max_image_tokens=max_image_tokens)


@main.command("serve")
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "torch", "onnx", "gguf", "tensorrt"]),
              help="Runtime backend (auto: from the artifact's manifest, torch for a checkpoint; tensorrt: a TensorRT "
                   "artifact's engines, built with `vlsi build`; onnx on a TensorRT artifact: its graphs on ONNX Runtime).")
@click.option("--providers", default=None, help="onnx backend: ONNX Runtime execution providers in order, e.g. "
                                                "tensorrt,cuda,cpu (default: the best this onnxruntime has).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind; 0.0.0.0 exposes it to the network.")
@click.option("--port", default=8000, show_default=True, help="TCP port.")
@click.option("--api-key", default=None, envvar="VLSI_API_KEY", help="Require `Authorization: Bearer KEY` on /v1/ (env VLSI_API_KEY).")
@click.option("--name", default=None, help="Model id in the API (default: the folder name).")
@click.option("--speculative", default=None, metavar="LAYER:TOKENS[:MIN_P]",
              help="Decode every answer self-speculatively: draft with layer LAYER's verbalizer, up to TOKENS per "
                   "cycle (stopping below MIN_P), verify with the model: plain decoding's tokens (greedy) or "
                   "distribution (sampling), faster when the drafts are accepted. ONNX artifacts.")
@_limits_options
def serve_cmd(model, backend, providers, host, port, api_key, name, speculative, **limits):
    """Serve an artifact or checkpoint: OpenAI-compatible /v1/chat/completions and the demo page at /."""
    from vlsi_apps.server import serve

    serve(model, backend=backend, host=host, port=port, api_key=api_key, name=name, limits=_limits(**limits),
          providers=providers, speculative=_parse_speculative(speculative) if speculative else None)


@main.command("demo")
@click.argument("model", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--quickstart-out", default="runs/quickstart", show_default=True, type=click.Path(file_okay=False),
              help="Where the quickstart's output is (it runs there first if missing).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option("--port", default=8000, show_default=True, help="TCP port.")
def demo_cmd(model, quickstart_out, host, port):
    """The demo app: serve MODEL, or the quickstart's VLsI student (exported to ONNX with its
    verbalizers when onnxruntime is installed), and print the URL."""
    from .demo import demo

    demo(model, quickstart_out=quickstart_out, host=host, port=port)


if __name__ == "__main__":
    main()
