"""``vlsi build ART``: TensorRT engines for this GPU from a TensorRT artifact, then the export's
fixtures run through them (device parity).

Engines are specific to a GPU and a TensorRT version (JetPack has no hardware-compatible
engines), so they are built where they run, into ``ART/engines/trt<version>_sm<cc>/``, beside
the graphs the export checked. Before building, the things that would otherwise fail late
or silently are refused in one line: a precision the GPU has no kernels for (fp8 below SM89,
nvfp4 below SM100), a graph the static op check says this TensorRT cannot parse, and caps
(``--max-context``, ``--max-image-tokens``) whose memory the preset's device does not have.

Every graph is built **strongly typed** (the precision is the graph's own: fp16, Q/DQ INT8,
INT4 weight-only DQ), with the preset's optimisation profiles (the decoder's ``prefill`` and
``decode``, the vision graph's patch range) and a timing cache kept in
``engines/timing.cache`` (rebuilds take minutes instead of most of an hour on an Orin). No
precision builder flag is used: TensorRT 11 removed them, and one build path serves 10.3
through 11.x. The engines are written into a temporary folder and renamed into place at the
end, so a failed build leaves nothing half-written; ``build.json`` inside records what was
built (TensorRT version, GPU, caps, profiles, build time and peak host memory per graph,
each plan's sha256).

Then the export's ``fixtures/`` (prompts with images, and what PyTorch answered) go through
the engines with the same host loop as every other backend, and the manifest's
``device_parity[<engines folder>]`` records top-1 agreement, greedy exact match and the
logits' and image embeddings' largest errors. Torch-free: this is what runs on a Jetson.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from vlsi.errors import ConfigError
from vlsi.manifest import ArtifactError, load_manifest, sha256_file, write_manifest

from .trt_presets import weight_bytes as _weight_bytes
from .trt_presets import budget, check_precision, get_preset, profiles

CHECK_TABLES = ("10.3", "10.15", "11")
"""TensorRT versions the static op check (:mod:`.trt_check`) has tables for; a version is
checked against the newest table not newer than it (10.7 -> 10.3, 10.16 -> 10.15, 11.2 -> 11)."""
TIMING_CACHE = "timing.cache"
GIB = float(1 << 30)


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".") if x.isdigit())


def check_table(version: str) -> str:
    """The op-check table for TensorRT ``version`` (``"10.7"`` -> ``"10.3"``)."""
    v = _version_tuple(version)
    known = [k for k in CHECK_TABLES if _version_tuple(k) <= v]
    if not known:
        raise ConfigError(f"TensorRT {version} is older than any version these graphs are checked for "
                          f"({', '.join(CHECK_TABLES)}): install TensorRT 10.3 or newer (JetPack 6)")
    return max(known, key=_version_tuple)


def weight_bytes(folder: Path, manifest) -> int:
    """Bytes of the engines' weights (see :func:`.trt_presets.weight_bytes`)."""
    return _weight_bytes(folder, [manifest.graph(n).file for n in ("vision", "decoder")])


def _peak_rss_gib() -> float | None:
    """Peak resident memory of this process so far (Linux reports KiB); None where there is no
    ``resource`` module (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3)


def _read_build_file(folder: Path) -> dict:
    path = folder / "build.json"
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: {folder} was not exported by `vlsi export --target tensorrt`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); re-export the artifact") from None


def _plan_profiles(folder: Path, manifest, build_file: dict, preset_name: str, max_context, max_image_tokens):
    """(max_context, max_image_tokens, profiles) for this build: the export's for the preset, or
    recomputed when a cap is given."""
    from vlsi.archs import get_spec

    preset = get_preset(preset_name)
    entry = build_file.get("presets", {}).get(preset_name)
    ctx = max_context or (entry["max_context"] if entry else preset.max_context)
    tokens = max_image_tokens or (entry["max_image_tokens"] if entry else preset.max_image_tokens)
    if entry and max_context is None and max_image_tokens is None:
        return ctx, tokens, entry["profiles"]
    spec = get_spec(manifest.arch)
    caps = spec.vision_caps(tokens, spec.image_spec(folder), manifest.model)
    return ctx, tokens, profiles(manifest.model, build_file["vision_signature"], caps, ctx, tokens)


def _op_check(folder: Path, manifest, version: str) -> dict:
    """The static op check of both graphs against ``version``'s table; refuses on a failure."""
    from .trt_check import check_graph

    key = check_table(version)
    out = {}
    for name in ("vision", "decoder"):
        g = manifest.graph(name)
        report = check_graph(folder / g.file, versions=(key,), precision=g.precision)
        out[name] = report.passed(key)
        if not out[name]:
            first = report.table().strip().splitlines()
            findings = getattr(report, "findings", {}).get(key) or []
            why = f"{findings[0].rule}: {findings[0].message}" if findings else (first[-1] if first else "see the op check")
            raise ConfigError(f"{g.file} would not build on TensorRT {version} (op check {key}): {why}; export with a "
                              "newer vlsi, or install a TensorRT this graph passes for (see build.json's op_check)")
    return out


def _network_flags(trt) -> int:
    """Strongly typed: opt in where the flag exists (10.x; 11.x keeps it and ignores it)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 1 << int(flag) if flag is not None else 0


def _timing_cache(config, data: bytes | None, where: Path):
    """A timing cache from ``data`` (the saved one) on this build config, or a fresh one when the
    saved one is from another TensorRT or GPU."""
    cache = config.create_timing_cache(data or b"")
    if cache is not None and config.set_timing_cache(cache, False):
        return cache
    if data:
        print(f"note: {where} is from another TensorRT version or GPU; starting a new timing cache", file=sys.stderr)
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, False):
        raise ConfigError("TensorRT could not create a timing cache; report this as a bug")
    return cache


def _build_graph(trt, builder, logger, path: Path, graph_profiles: list[dict], opt_level: int,
                 workspace_gib: float | None, cache, cache_path: Path):
    """One strongly typed engine from ``path`` with ``graph_profiles``; returns (plan, cache).
    ``cache``: the saved timing cache's bytes (or None) for the first graph, then the
    ``ITimingCache`` the first build made (shared by every graph of the build)."""
    version = trt.__version__
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errors = [str(parser.get_error(i)).strip().splitlines()[0] for i in range(parser.num_errors)]
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(f"TensorRT {version}'s ONNX parser refuses {path.name}: "
                          f"{errors[0] if errors else logger.last_error()}{more}; the static op check missed this: "
                          "report it, with `vlsi --version` and the TensorRT version")
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    config = builder.create_builder_config()
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * GIB))
    config.builder_optimization_level = int(opt_level)
    monitor = getattr(trt.BuilderFlag, "MONITOR_MEMORY", None)
    if monitor is not None:
        config.set_flag(monitor)
    for i, p in enumerate(graph_profiles):
        missing = [n for n in inputs if n not in p["shapes"]]
        if missing:
            raise ArtifactError(f"build.json's {p['name']!r} profile has no shapes for {path.name}'s inputs "
                                f"{missing[:4]}; re-export the artifact")
        prof = builder.create_optimization_profile()
        for name in inputs:
            lo, opt, hi = (tuple(int(d) for d in s) for s in p["shapes"][name])
            prof.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(prof) != i:
            raise ConfigError(f"TensorRT refused the {p['name']!r} profile of {path.name}; re-export the artifact")
    if hasattr(cache, "serialize"):  # the cache the previous graph's build filled
        if not config.set_timing_cache(cache, False):
            raise ConfigError(f"TensorRT refused the timing cache; delete {cache_path} and build again")
    else:  # the saved bytes (or None): the first graph
        cache = _timing_cache(config, cache, cache_path)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ConfigError(f"TensorRT {version} could not build {path.name} ({logger.last_error()}); when it ran out "
                          "of memory, build with a smaller --max-context or --max-image-tokens (or --workspace-gib), "
                          "and close other programs")
    return plan, cache


def build(artifact, preset: str | None = None, max_context: int | None = None, max_image_tokens: int | None = None,
          opt_level: int = 3, workspace_gib: float | None = None, timing_cache=None, device=None) -> Path:
    """Build TensorRT engines for this GPU from a TensorRT artifact, then run its fixtures
    through them and record the device parity in its manifest; returns the engines folder.

    ``preset``: whose caps and profiles (default: the export's); ``max_context`` /
    ``max_image_tokens`` override the preset's caps (profiles recomputed); ``opt_level``:
    TensorRT's builder optimisation level (0-5); ``workspace_gib``: TensorRT's workspace limit
    (default: TensorRT's own, the device memory); ``timing_cache``: its file (default
    ``engines/timing.cache``); ``device``: a :class:`vlsi_runtimes.tensorrt_engine.Device`."""
    from vlsi.atomic import atomic_dir, atomic_write_text
    from vlsi_runtimes.tensorrt_engine import (ENGINES, PLANS, RECORD, default_device, engine_dir_name,
                                               import_tensorrt, make_logger, tensorrt_version, using_device)

    folder = Path(artifact)
    manifest = load_manifest(folder)
    if manifest.target != "tensorrt":
        raise ArtifactError(f"{folder} is a {manifest.target!r} artifact; `vlsi build` takes one exported with "
                            "--target tensorrt")
    for name, value in (("max-context", max_context), ("max-image-tokens", max_image_tokens)):
        if value is not None and value < 1:
            raise ConfigError(f"--{name} {value}: must be >= 1")
    if not 0 <= opt_level <= 5:
        raise ConfigError(f"--opt-level {opt_level}: must be between 0 and 5")
    if workspace_gib is not None and workspace_gib <= 0:
        raise ConfigError(f"--workspace-gib {workspace_gib}: must be > 0")
    build_file = _read_build_file(folder)
    preset_name = preset or build_file.get("default_preset")
    preset_obj = get_preset(preset_name)

    trt = import_tensorrt()
    version = tensorrt_version(trt)
    check_table(version)  # refuses a TensorRT older than 10.3 before anything else
    dev = device or default_device()
    for name in ("decoder", "vision"):
        check_precision(manifest.graph(name).precision, dev.sm, f"this GPU ({dev.name})")
    check_precision(manifest.precision, dev.sm, f"this GPU ({dev.name})")

    ctx, tokens, plan_profiles = _plan_profiles(folder, manifest, build_file, preset_name, max_context,
                                                max_image_tokens)
    b = budget(preset_obj, manifest.model, weight_bytes(folder, manifest),
               (folder / manifest.graph("embed").file).stat().st_size, build_file.get("vision", {}),
               max_context=ctx, max_image_tokens=tokens)
    if not b.fits:
        raise ConfigError(f"the engines would not fit {preset_name}: {b.line()}; build with a smaller --max-context "
                          "(or --max-image-tokens), or export with --quant int4")
    op_check = _op_check(folder, manifest, version)

    dirname = engine_dir_name(version, dev.capability)
    root = folder / ENGINES
    created = not root.exists()
    cache_path = Path(timing_cache) if timing_cache else root / TIMING_CACHE
    logger = make_logger(trt)
    print(f"building TensorRT {trt.__version__} engines for {dev.name} (sm{dev.sm}), preset {preset_name}: context "
          f"{ctx}, image tokens {tokens}", file=sys.stderr)
    try:
        with atomic_dir(root / dirname, overwrite=True) as tmp:
            builder = trt.Builder(logger)
            if builder is None:
                raise ConfigError(f"TensorRT could not create a builder ({logger.last_error()}); is a GPU visible?")
            cache = cache_path.read_bytes() if cache_path.is_file() else None
            graphs = {}
            for name in ("vision", "decoder"):
                t0 = time.perf_counter()
                plan, cache = _build_graph(trt, builder, logger, folder / manifest.graph(name).file,
                                           plan_profiles[name], opt_level, workspace_gib, cache, cache_path)
                out = tmp / PLANS[name]
                with open(out, "wb") as f:
                    f.write(memoryview(plan))
                del plan
                graphs[name] = {"plan": out.name, "bytes": out.stat().st_size, "sha256": sha256_file(out),
                                "seconds": round(time.perf_counter() - t0, 2), "peak_host_rss_gib": _peak_rss_gib(),
                                "precision": manifest.graph(name).precision}
                print(f"  {name}: {graphs[name]['bytes'] / 2**20:.1f} MiB in {graphs[name]['seconds']:.0f} s",
                      file=sys.stderr)
            record = {"tensorrt": version, "tensorrt_full": str(trt.__version__), "sm": dev.sm,
                      "compute_capability": list(dev.capability), "gpu": dev.name, "device_api": dev.kind,
                      "preset": preset_name, "max_context": ctx, "max_image_tokens": tokens,
                      "profiles": plan_profiles, "opt_level": opt_level, "workspace_gib": workspace_gib,
                      "op_check": {"table": check_table(version), "passed": op_check}, "budget": b.to_dict(),
                      "graphs": graphs, "peak_host_rss_gib": _peak_rss_gib()}
            atomic_write_text(tmp / RECORD, json.dumps(record, indent=2) + "\n")
            if cache is not None and hasattr(cache, "serialize"):
                cache_path.parent.mkdir(parents=True, exist_ok=True)
                part = cache_path.with_name(cache_path.name + ".part")
                part.write_bytes(memoryview(cache.serialize()))
                part.replace(cache_path)
            del builder, cache  # the builder's memory is not needed to run the engines
    except BaseException:
        if created and root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        raise
    with using_device(device):
        parity = device_parity(folder, dirname)
    print(parity_line(parity, dirname))
    return root / dirname


def device_parity(folder, dirname: str) -> dict:
    """Run the artifact's fixtures through ``engines/<dirname>`` and record the result in the
    manifest's ``device_parity[dirname]``; returns that entry."""
    from vlsi_runtimes.tensorrt_backend import TensorRTRuntime

    folder = Path(folder)
    fx_path = folder / "fixtures" / "fixtures.json"
    if not fx_path.is_file():
        entry = {"run": False, "reason": "the artifact has no fixtures (fixtures/fixtures.json)"}
    else:
        fixtures = json.loads(fx_path.read_text())
        reference = np.load(folder / "fixtures" / "reference.npz")
        rt = TensorRTRuntime(folder, engine="tensorrt", engines=dirname)
        try:
            entry = {**_measure(rt, folder, fixtures, reference), "engine": rt.runner.engines_dir.name,
                     "gpu": rt.runner.device.name, "tensorrt": rt.runner.record.get("tensorrt")}
        finally:
            rt.runner.close()
    manifest = load_manifest(folder)
    if entry.get("run"):  # the CPU gate's bounds on the same metrics, for the engines
        from .tolerances import TOLERANCES, tolerance_key

        rows = TOLERANCES[tolerance_key(manifest)]
        m = entry["metrics"]
        entry["failures"] = [f"{k} = {m[k]:.4g}, needs {op} {bound:g}" for k, (op, bound) in rows.items()
                             if m.get(k) is not None and not (m[k] >= bound - 1e-12 if op == ">=" else m[k] <= bound + 1e-12)]
        entry["passed"] = not entry["failures"]
    manifest.device_parity[dirname] = entry
    write_manifest(folder, manifest)
    return entry


def _measure(rt, folder: Path, fixtures: dict, reference) -> dict:
    """The fixtures through runtime ``rt``, against the PyTorch reference."""
    n_new = int(fixtures["max_new_tokens"])
    per, agree, steps, greedy = [], 0, 0, 0
    logits_err, vision_err = 0.0, 0.0
    for i, s in enumerate(fixtures["samples"]):
        images = [folder / p for p in s["images"]]
        ref_ids = [int(t) for t in s["reference_ids"]]
        try:
            ids = list(rt.stream_tokens(images, s["prompt"], n_new))
            # teacher-forced: the next token after the prompt and after each reference token; a
            # reference that stopped early was followed by an end-of-turn token
            targets = ref_ids + ([None] if len(ref_ids) < n_new else [])
            steps_out = rt.logits(images, s["prompt"], continuation=targets[:-1])
            embeds = rt.image_embeds(images)
        except ConfigError as e:  # caps smaller than this fixture
            per.append({"id": s.get("id"), "skipped": str(e)})
            continue
        hits = 0
        for lg, target in zip(steps_out, targets):
            top = int(np.argmax(lg["final"]))
            hits += (top in rt.eos_ids) if target is None else (top == target)
        err = float(np.abs(steps_out[0]["final"] - reference[f"logits_{i}"]).max())
        ref_embeds = reference[f"image_embeds_{i}"]
        verr = float(np.abs(embeds - ref_embeds).max()) if embeds.shape == ref_embeds.shape else float("inf")
        agree, steps, greedy = agree + hits, steps + len(targets), greedy + (ids == ref_ids)
        logits_err, vision_err = max(logits_err, err), max(vision_err, verr)
        per.append({"id": s.get("id"), "tokens": ids, "greedy_match": ids == ref_ids, "top1": hits / len(targets),
                    "logits_max_abs": err, "vision_max_abs": verr})
    run = [p for p in per if "skipped" not in p]
    metrics = {"samples": len(run), "skipped": len(per) - len(run),
               "top1": agree / steps if steps else None, "greedy_match": greedy / len(run) if run else None,
               "logits_max_abs": logits_err if run else None, "vision_max_abs": vision_err if run else None}
    return {"run": bool(run), "metrics": metrics, "per_sample": per}


def parity_line(entry: dict, dirname: str) -> str:
    """The one line a build prints (and reports repeat): ``TensorRT device parity: ...``."""
    if not entry.get("run"):
        return f"TensorRT device parity: not run ({entry.get('reason', 'no fixture fitted the caps')})"
    m = entry["metrics"]
    skipped = f", {m['skipped']} skipped (over the caps)" if m["skipped"] else ""
    verdict = "" if "passed" not in entry else ("PASSED, " if entry["passed"] else
                                                "FAILED (" + "; ".join(entry["failures"]) + "), ")
    return (f"TensorRT device parity: {verdict}{m['samples']} fixtures on {dirname}{skipped}: top-1 {m['top1']:.3f}, greedy "
            f"match {m['greedy_match']:.3f}, logits max-abs {m['logits_max_abs']:.4g}, image embeds max-abs "
            f"{m['vision_max_abs']:.4g}")
