"""The TensorRT engine runner and ``vlsi build``, run here against a fake ``tensorrt`` module.

The fake (``tests/fake_tensorrt.py``) executes each "engine" with ONNX Runtime on the bytes
behind the bound device addresses, and raises on every breach of TensorRT's call contract.
So the real :class:`~vlsi_runtimes.tensorrt_engine.EngineRunner` (buffers, profiles, the
ping-pong KV cache on the device) and the real :func:`vlsi_export.trt_build.build` (profiles,
timing cache, atomic folder, build record, device parity) are exercised end to end: the
engines must generate exactly the tokens the ONNX Runtime session generates over the same
files. What only a real GPU can show (TensorRT's kernels, its tolerances, build memory) is
in the one ``tensorrt``-marked test, which skips where TensorRT is not installed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
import sys
import types

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

from vlsi.errors import ConfigError  # noqa: E402
from vlsi.manifest import load_manifest, write_manifest  # noqa: E402
from vlsi_runtimes import tensorrt_engine as te  # noqa: E402
from vlsi_runtimes.tensorrt_backend import TensorRTRuntime, install_hint  # noqa: E402
from vlsi_export.trt_build import _measure, build, check_table, parity_line  # noqa: E402

from . import fake_tensorrt as fake  # noqa: E402
from .conftest import png_bytes  # noqa: E402


class _PassingReport:
    def __init__(self, versions):
        self.versions = versions
        self.findings = {v: [] for v in versions}

    def passed(self, v):
        return True

    def table(self):
        return "| check | " + " | ".join(self.versions) + " |"


def _stub_check_module():
    """``vlsi_export.trt_check`` while it is being written elsewhere: every graph passes."""
    mod = types.ModuleType("vlsi_export.trt_check")
    mod.check_graph = lambda path, versions=("10.3",), precision="fp16": _PassingReport(versions)
    return mod


def _have_check() -> bool:
    try:
        import vlsi_export.trt_check  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(autouse=True)
def _op_check(monkeypatch):
    if not _have_check():
        monkeypatch.setitem(sys.modules, "vlsi_export.trt_check", _stub_check_module())


@pytest.fixture(scope="module")
def artifact(tiny_ckpt, tmp_path_factory):
    """``tiny_ckpt`` exported with ``--target tensorrt`` (fp16, verbalizers kept): graphs, not engines."""
    from vlsi_export import get_target

    with pytest.MonkeyPatch.context() as mp:
        if not _have_check():
            mp.setitem(sys.modules, "vlsi_export.trt_check", _stub_check_module())
        return get_target("tensorrt")(tiny_ckpt, tmp_path_factory.mktemp("trt") / "fp16", quant="fp16",
                                      verbalizers=True, parity_samples=2)


@pytest.fixture
def art(artifact, tmp_path):
    """A private copy of the artifact (builds write engines/ and rewrite the manifest)."""
    return shutil.copytree(artifact, tmp_path / "art")


@pytest.fixture(scope="module")
def built(artifact, tmp_path_factory):
    """A copy of the artifact with engines built by the fake TensorRT 10.3 on a fake Orin (SM 8.7)."""
    folder = shutil.copytree(artifact, tmp_path_factory.mktemp("built") / "art")
    with pytest.MonkeyPatch.context() as mp:
        if not _have_check():
            mp.setitem(sys.modules, "vlsi_export.trt_check", _stub_check_module())
        trt, dev = fake.install(mp)
        path = build(folder)
    return folder, path, trt


PROMPTS = [([png_bytes((84, 84), (200, 30, 30))], "What colour is the square?"),
           ([png_bytes((56, 112), (20, 160, 40)), png_bytes((84, 56), (10, 10, 220))], "Compare the two images."),
           ([], "Say something.")]


# ------------------------------------------------------------------ (a) the engines answer as ONNX Runtime does
def test_build_writes_engines_record_and_device_parity(built):
    folder, path, trt = built
    assert path == folder / "engines" / "trt10.3_sm87"
    assert {p.name for p in path.iterdir()} == {"vision.plan", "decoder.plan", "build.json"}
    assert (folder / "engines" / "timing.cache").is_file()
    assert not [p for p in (folder / "engines").iterdir() if p.name.startswith(".")]  # no temp folders left
    rec = json.loads((path / "build.json").read_text())
    assert rec["tensorrt"] == "10.3" and rec["sm"] == 87 and rec["gpu"] == "Fake Jetson Orin"
    assert rec["preset"] == "orin-nano" and rec["max_context"] == 1024 and rec["max_image_tokens"] == 256
    assert [p["name"] for p in rec["profiles"]["decoder"]] == ["prefill", "decode"]
    for g in ("vision", "decoder"):
        assert rec["graphs"][g]["bytes"] > 0 and len(rec["graphs"][g]["sha256"]) == 64
        assert rec["graphs"][g]["seconds"] >= 0 and rec["graphs"][g]["peak_host_rss_gib"] > 0
    builds = [d for what, d in trt.calls if what == "build"]
    assert [d["profiles"] for d in builds] == [1, 2]  # vision: one profile; decoder: prefill + decode
    assert all(d["level"] == 3 and "MONITOR_MEMORY" in d["flags"] for d in builds)

    m = load_manifest(folder)  # engines/ is not part of the hashed payload: the manifest still verifies
    dp = m.device_parity["trt10.3_sm87"]
    assert dp["run"] and dp["metrics"]["samples"] >= 1 and dp["metrics"]["skipped"] == 0
    assert dp["engine"] == "trt10.3_sm87" and dp["gpu"] == "Fake Jetson Orin" and dp["tensorrt"] == "10.3"
    # the fake runs the exported graphs themselves: device parity is what the same fixtures give
    # on ONNX Runtime over the same files, to the last bit
    fixtures = json.loads((folder / "fixtures" / "fixtures.json").read_text())
    on_cpu = _measure(TensorRTRuntime(folder, engine="onnxruntime"), folder, fixtures,
                      np.load(folder / "fixtures" / "reference.npz"))
    assert dp["metrics"] == on_cpu["metrics"] and dp["metrics"]["samples"] == len(fixtures["samples"])
    assert dp["metrics"]["top1"] >= 0.9 and dp["metrics"]["logits_max_abs"] < 0.1
    assert dp["metrics"]["vision_max_abs"] < 0.05
    assert not any(p.startswith("engines/") for p in m.files)


def test_engines_generate_exactly_what_onnxruntime_generates(built, monkeypatch):
    folder, path, _ = built
    trt, dev = fake.install(monkeypatch)
    engines = TensorRTRuntime(folder, engine="tensorrt")
    ort = TensorRTRuntime(folder, engine="onnxruntime")
    assert engines.runner.engines_dir == path and engines.runner.max_context == 1024
    for images, prompt in PROMPTS:
        a = list(engines.stream_tokens(images, prompt, 12, ignore_eos=True))
        b = list(ort.stream_tokens(images, prompt, 12, ignore_eos=True))
        assert a == b and len(a) == 12
        la = engines.logits(images, prompt, continuation=a[:5])
        lb = ort.logits(images, prompt, continuation=a[:5])
        for x, y in zip(la, lb):
            assert set(x) == set(y) == {"final", 1, 3, 5}  # the verbalizers come out too
            for k in x:
                np.testing.assert_allclose(x[k], y[k], rtol=0, atol=1e-5)
        if images:
            np.testing.assert_allclose(engines.image_embeds(images), ort.image_embeds(images), atol=1e-6)
    assert engines.verbalize(*PROMPTS[0], max_new_tokens=4) == ort.verbalize(*PROMPTS[0], max_new_tokens=4)
    runs = [d for what, d in trt.calls if what == "execute" and d["onnx"] == "decoder.onnx"]
    prefill = [d for d in runs if d["profile"] == 0]
    decode = [d for d in runs if d["profile"] == 1]
    assert prefill and decode
    assert all(d["shapes"]["inputs_embeds"][1] == 1 and d["shapes"]["past_key_0"][2] > 0 for d in decode)
    assert all(d["shapes"]["past_key_0"][2] == 0 or d["shapes"]["inputs_embeds"][1] > 1 for d in prefill)


def test_only_embeddings_and_logits_cross_the_bus(built, monkeypatch):
    """A decode step copies the new token's embedding, mask and rotary rows in and the logits
    out; the KV cache never leaves the device, and its buffers are reused across prompts."""
    folder, _, _ = built
    trt, dev = fake.install(monkeypatch)
    rt = TensorRTRuntime(folder, engine="tensorrt")
    m = rt.model
    state, _ = rt._prefill(rt.encode(*PROMPTS[0]))
    allocs = dev.allocs
    before_in, before_out = dev.htod_bytes, dev.dtoh_bytes
    rt._step(state, 7)
    length = state["length"]
    d, hd, v = m["hidden_size"], m["head_dim"], m["vocab_size"]
    assert dev.htod_bytes - before_in == d * 2 + length * 8 + 2 * hd * 4  # fp16 row, int64 mask, fp32 cos + sin
    assert dev.dtoh_bytes - before_out == 4 * v * 4  # logits + 3 verbalizers, fp32
    assert dev.allocs == allocs  # nothing allocated per step
    del state
    rt.generate(PROMPTS[0][0], "Another question about the same image?", max_new_tokens=3)
    assert dev.allocs == allocs  # the second prompt reused the first one's KV and input buffers


def test_tensorrt_11_and_10_0_api_paths(artifact, tmp_path, monkeypatch):
    """No STRONGLY_TYPED member (flags 0), and a TensorRT without USER_MANAGED contexts or the
    *_v2 memory queries (10.0's API: plain contexts, each with its own memory): same tokens."""
    folder = shutil.copytree(artifact, tmp_path / "a")
    dev = fake.FakeDevice(capability=(12, 0), name="Fake RTX")
    trt, _ = fake.install(monkeypatch, dev, version="11.1.0.5", strongly_typed_flag=False)
    path = build(folder, preset="desktop", max_context=256, max_image_tokens=64)
    assert path.name == "trt11.1_sm120"
    ids = list(TensorRTRuntime(folder).stream_tokens(*PROMPTS[0], 6, ignore_eos=True))
    ort = list(TensorRTRuntime(folder, engine="onnxruntime").stream_tokens(*PROMPTS[0], 6, ignore_eos=True))
    assert ids == ort
    dev = fake.FakeDevice(capability=(8, 9), name="Fake Ada")
    fake.install(monkeypatch, dev, version="10.4.0", user_managed=False, memory_v2=False)
    path = build(folder, max_context=128, max_image_tokens=32)
    assert path.name == "trt10.4_sm89" and sorted(p.name for p in (folder / "engines").iterdir() if p.is_dir()) == [
        "trt10.4_sm89", "trt11.1_sm120"]
    assert list(TensorRTRuntime(folder).stream_tokens(*PROMPTS[0], 6, ignore_eos=True)) == ort


def test_caps_recompute_profiles_and_bound_the_runtime(art, monkeypatch):
    fake.install(monkeypatch)
    path = build(art, max_context=96, max_image_tokens=16)
    rec = json.loads((path / "build.json").read_text())
    assert rec["max_context"] == 96 and rec["max_image_tokens"] == 16
    prefill = rec["profiles"]["decoder"][0]["shapes"]
    assert prefill["inputs_embeds"][2][1] == 96 and prefill["past_key_0"][2][2] == 95
    assert rec["profiles"]["vision"][0]["shapes"]["pixel_values"][2][0] == 16 * 4  # merge 2x2: 4 patches a token
    rt = TensorRTRuntime(art)
    assert rt.runner.max_context == 96
    with pytest.raises(ConfigError, match="--max-image-tokens"):
        rt.generate([png_bytes((84, 84))] * 2, "Describe.", max_new_tokens=2)  # 9 tokens each
    with pytest.raises(ConfigError, match="--max-context"):
        rt.generate([], "word " * 200, max_new_tokens=2)


# ------------------------------------------------------------------ (b) the fake enforces the contract
def _tiny_graph(path):
    """z = x + y over (n, 4) fp16, one dynamic axis."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["n", 4])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT16, ["n", 4])
    g = helper.make_graph([helper.make_node("Add", ["x", "y"], ["z"])], "add", [x, y], [z])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), str(path))
    return path


@pytest.fixture
def tiny_engine(tmp_path):
    dev = fake.FakeDevice()
    trt = fake.make_module(dev)
    logger = trt.Logger()
    builder = trt.Builder(logger)
    net = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    assert trt.OnnxParser(net, logger).parse_from_file(str(_tiny_graph(tmp_path / "add.onnx")))
    config = builder.create_builder_config()
    config.set_timing_cache(config.create_timing_cache(b""), False)
    for lo, hi in ((1, 8), (1, 1)):
        prof = builder.create_optimization_profile()
        for name in ("x", "y"):
            prof.set_shape(name, (lo, 4), (hi, 4), (hi, 4))
        config.add_optimization_profile(prof)
    engine = trt.Runtime(logger).deserialize_cuda_engine(builder.build_serialized_network(net, config))
    return trt, dev, engine


def _bind_and_run(trt, dev, ctx, n=3, order="shapes-first"):
    x = np.arange(n * 4, dtype=np.float16).reshape(n, 4)
    ptrs = {k: dev.alloc(x.nbytes) for k in "xyz"}
    dev.htod(ptrs["x"], x)
    dev.htod(ptrs["y"], x)
    if order == "shapes-first":
        ctx.set_input_shape("x", x.shape)
        ctx.set_input_shape("y", x.shape)
        for k in "xyz":
            ctx.set_tensor_address(k, ptrs[k])
    else:
        ctx.set_input_shape("x", x.shape)
        ctx.set_tensor_address("x", ptrs["x"])
        ctx.set_input_shape("y", x.shape)
    ctx.execute_async_v3(dev.stream)
    return dev.dtoh(ptrs["z"], x.shape, np.float16), x


def test_the_fake_runs_a_graph_behind_device_addresses(tiny_engine):
    trt, dev, engine = tiny_engine
    ctx = engine.create_execution_context()
    ctx.set_optimization_profile_async(0, dev.stream)
    z, x = _bind_and_run(trt, dev, ctx)
    np.testing.assert_array_equal(z, x + x)
    z, x = _bind_and_run(trt, dev, ctx, n=5)  # shapes and addresses set again for every call
    np.testing.assert_array_equal(z, x + x)


def test_an_address_before_a_shape_fails(tiny_engine):
    trt, dev, engine = tiny_engine
    ctx = engine.create_execution_context()
    ctx.set_optimization_profile_async(0, dev.stream)
    with pytest.raises(fake.ContractError, match="before the shape of y"):
        _bind_and_run(trt, dev, ctx, order="interleaved")


def test_every_tensor_bound_in_every_call(tiny_engine):
    trt, dev, engine = tiny_engine
    ctx = engine.create_execution_context()
    ctx.set_optimization_profile_async(0, dev.stream)
    _bind_and_run(trt, dev, ctx)
    ctx.set_input_shape("x", (3, 4))
    ctx.set_input_shape("y", (3, 4))
    ctx.set_tensor_address("x", dev.alloc(24))
    ctx.set_tensor_address("y", dev.alloc(24))
    with pytest.raises(fake.ContractError, match=r"\['z'\] not bound"):  # last call's z does not count
        ctx.execute_async_v3(dev.stream)
    with pytest.raises(fake.ContractError, match="not set in this call"):
        ctx2 = engine.create_execution_context()
        ctx2.set_optimization_profile_async(1, dev.stream)
        ctx2.get_tensor_shape("z")


def test_shapes_within_the_contexts_own_profile(tiny_engine):
    trt, dev, engine = tiny_engine
    decode = engine.create_execution_context()
    decode.set_optimization_profile_async(1, dev.stream)  # profile 1 takes n == 1 only
    with pytest.raises(fake.ContractError, match="outside profile 1"):
        decode.set_input_shape("x", (3, 4))
    with pytest.raises(fake.ContractError, match="already set to profile 1"):
        decode.set_optimization_profile_async(0, dev.stream)
    other = engine.create_execution_context()
    with pytest.raises(fake.ContractError, match="already belongs to another context"):
        other.set_optimization_profile_async(1, dev.stream)
    with pytest.raises(fake.ContractError, match="before set_optimization_profile_async"):
        other.set_input_shape("x", (1, 4))


def test_buffers_user_memory_and_stream_are_checked(tiny_engine):
    trt, dev, engine = tiny_engine
    ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    ctx.set_optimization_profile_async(0, dev.stream)
    with pytest.raises(fake.ContractError, match="without 4096 bytes"):
        _bind_and_run(trt, dev, ctx)
    ctx.set_device_memory(dev.alloc(4096), 4096)
    ctx.set_input_shape("x", (2, 4))
    ctx.set_input_shape("y", (2, 4))
    small, shared = dev.alloc(8), dev.alloc(16)
    ctx.set_tensor_address("x", shared)
    ctx.set_tensor_address("y", small)
    ctx.set_tensor_address("z", shared)
    with pytest.raises(fake.ContractError, match="overrun"):  # y needs 16 bytes
        ctx.execute_async_v3(dev.stream)
    ctx.set_input_shape("x", (2, 4))
    ctx.set_input_shape("y", (2, 4))
    for k in "xyz":
        ctx.set_tensor_address(k, shared if k != "y" else dev.alloc(16))
    with pytest.raises(fake.ContractError, match="bound over input x"):
        ctx.execute_async_v3(dev.stream)
    with pytest.raises(fake.ContractError, match="another stream"):
        ctx.execute_async_v3(12345)
    ctx.set_input_shape("x", (2, 4))
    ctx.set_input_shape("y", (2, 4))
    with pytest.raises(fake.ContractError, match="not in any live"):
        ctx.set_tensor_address("x", 42)


def test_removed_apis_and_weak_typing_are_refused(tiny_engine):
    trt, dev, engine = tiny_engine
    for look in (lambda: trt.BuilderFlag.FP16, lambda: trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS,
                 lambda: hasattr(trt.BuilderFlag, "INT8"), lambda: trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH,
                 lambda: engine.create_execution_context_without_device_memory(), lambda: engine.device_memory_size,
                 lambda: engine.num_bindings, lambda: engine.create_execution_context().execute_async_v2,
                 lambda: trt.Builder(trt.Logger()).build_engine):
        with pytest.raises(fake.ContractError, match="removed"):
            look()
    with pytest.raises(fake.ContractError, match="STRONGLY_TYPED"):
        trt.Builder(trt.Logger()).create_network(0)
    with pytest.raises(fake.ContractError, match="removed flag"):
        trt.Builder(trt.Logger()).create_network(1)  # bit 0: EXPLICIT_BATCH in 10.x


def _address_first(monkeypatch, rt):
    shapes = te.Engine.shapes

    def bad(self, profile, sizes):  # binds an input before the shapes are set
        self.contexts[profile].set_tensor_address(self.inputs[0], self.device.alloc(1 << 16))
        return shapes(self, profile, sizes)

    monkeypatch.setattr(te.Engine, "shapes", bad)


def _no_ping_pong(monkeypatch, rt):
    new_cache = rt.runner.new_cache

    def aliased():  # present written into the very buffer the past is read from
        cache = new_cache()
        for layer in cache.buffers:
            for kind in layer:
                layer[kind] = (layer[kind][0], layer[kind][0])
        return cache

    monkeypatch.setattr(rt.runner, "new_cache", aliased)


def _swapped_profiles(monkeypatch, rt):
    rt.runner.prefill, rt.runner.decode = rt.runner.decode, rt.runner.prefill


@pytest.mark.parametrize("breakage, match", [(_address_first, "before the shape of"),
                                             (_no_ping_pong, "bound over input past_"),
                                             (_swapped_profiles, "outside profile 1")])
def test_a_runner_that_breaks_the_contract_fails_the_fake(built, monkeypatch, breakage, match):
    fake.install(monkeypatch)
    rt = TensorRTRuntime(built[0], engine="tensorrt")
    breakage(monkeypatch, rt)
    with pytest.raises(fake.ContractError, match=match):
        rt.generate(*PROMPTS[0], max_new_tokens=3)


def test_plans_for_another_version_or_gpu_do_not_deserialize(tiny_engine, tmp_path):
    trt, dev, engine = tiny_engine
    other = fake.make_module(fake.FakeDevice(capability=(8, 9)))
    logger = other.Logger()
    builder = trt.Builder(trt.Logger())
    net = builder.create_network(2)
    trt.OnnxParser(net, logger).parse_from_file(str(_tiny_graph(tmp_path / "a.onnx")))
    config = builder.create_builder_config()
    config.set_timing_cache(config.create_timing_cache(b""), False)
    prof = builder.create_optimization_profile()
    for name in ("x", "y"):
        prof.set_shape(name, (1, 4), (2, 4), (4, 4))
    config.add_optimization_profile(prof)
    plan = builder.build_serialized_network(net, config)
    assert other.Runtime(logger).deserialize_cuda_engine(plan) is None and "not compatible" in logger.errors[-1]
    assert other.Runtime(logger).deserialize_cuda_engine(b"garbage") is None


# ------------------------------------------------------------------ (c) refusals, in one line each
def test_no_tensorrt_says_how_to_install_it(art, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(te.EngineError) as e:
        build(art)
    assert install_hint() in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(te.EngineError, match="python3-libnvinfer"):
        TensorRTRuntime(art, engine="tensorrt")


def test_missing_engines_name_vlsi_build(art, monkeypatch):
    fake.install(monkeypatch)
    with pytest.raises(te.EngineError, match=r"no TensorRT engines yet.*`vlsi build "):
        TensorRTRuntime(art, engine="tensorrt")
    (art / "engines").mkdir()
    with pytest.raises(te.EngineError, match="holds no built engines"):
        TensorRTRuntime(art, engine="tensorrt")
    with pytest.raises(te.EngineError, match="holds no built engines"):
        TensorRTRuntime(art, engine="tensorrt", engines="trt9.9_sm11")


def test_engines_for_another_tensorrt_or_gpu(built, monkeypatch, tmp_path):
    folder = shutil.copytree(built[0], tmp_path / "a")
    fake.install(monkeypatch, fake.FakeDevice(capability=(8, 9), name="Fake RTX 4090"), version="10.15.1")
    with pytest.raises(te.EngineError) as e:
        TensorRTRuntime(folder, engine="tensorrt")
    msg = str(e.value)
    assert "trt10.3_sm87" in msg and "trt10.15_sm89" in msg and "on this machine" in msg and "\n" not in msg
    with pytest.raises(te.EngineError, match="built for TensorRT 10.3 on sm87"):  # named explicitly: refused too
        TensorRTRuntime(folder, engine="tensorrt", engines="trt10.3_sm87")
    fake.install(monkeypatch)  # the right machine, a damaged plan
    (folder / "engines" / "trt10.3_sm87" / "decoder.plan").write_bytes(b"\0" * 64)
    with pytest.raises(te.EngineError, match=r"decoder.plan does not deserialize on TensorRT 10.3.*magicTag.*vlsi build"):
        TensorRTRuntime(folder, engine="tensorrt")


def test_fp8_is_refused_on_orin(art, monkeypatch):
    fake.install(monkeypatch)
    m = load_manifest(art)
    m.precision = "fp8"
    m.graphs["decoder"].precision = "fp8"
    write_manifest(art, m)
    with pytest.raises(ConfigError, match=r"fp8 needs a GPU of compute capability 8.9.*is 8.7"):
        build(art)
    assert not (art / "engines").exists()


def test_a_budget_that_does_not_fit_is_refused(art, monkeypatch):
    fake.install(monkeypatch)
    with pytest.raises(ConfigError, match=r"would not fit orin-nano.*--max-context") as e:
        build(art, max_context=50_000_000)
    assert "\n" not in str(e.value)
    assert not (art / "engines").exists()


def test_a_failed_parse_or_build_leaves_no_engines_folder(art, monkeypatch, capsys):
    fake.install(monkeypatch, fail_parse="No importer registered for op: Attention")
    with pytest.raises(ConfigError, match="parser refuses vision.onnx: .*Attention"):
        build(art)
    assert not (art / "engines").exists()
    fake.install(monkeypatch, fail_build=True)
    with pytest.raises(ConfigError, match=r"could not build vision.onnx \(fake: out of memory.*--max-context"):
        build(art)
    assert not (art / "engines").exists()
    fake.install(monkeypatch)  # a rebuild over existing engines that fails keeps the old ones
    good = build(art)
    plan = (good / "decoder.plan").read_bytes()
    fake.install(monkeypatch, fail_build=True)
    with pytest.raises(ConfigError):
        build(art)
    assert (good / "decoder.plan").read_bytes() == plan
    assert sorted(p.name for p in (art / "engines").iterdir()) == ["timing.cache", "trt10.3_sm87"]


def test_an_op_check_failure_is_refused(art, monkeypatch):
    fake.install(monkeypatch)
    finding = types.SimpleNamespace(rule="op", message="Attention is not parsed by TensorRT 10.3")
    report = types.SimpleNamespace(passed=lambda v: False, table=lambda: "", findings={"10.3": [finding]})
    mod = types.ModuleType("vlsi_export.trt_check")
    mod.check_graph = lambda path, versions, precision: report
    monkeypatch.setitem(sys.modules, "vlsi_export.trt_check", mod)
    with pytest.raises(ConfigError, match=r"would not build on TensorRT 10.3 \(op check 10.3\): op: Attention"):
        build(art)
    assert not (art / "engines").exists()


def test_timing_cache_is_reused_and_a_foreign_one_replaced(art, monkeypatch, capsys):
    fake.install(monkeypatch)
    build(art, max_context=64, max_image_tokens=16)
    cache = (art / "engines" / "timing.cache").read_bytes()
    assert b"vision.onnx" in cache and b"decoder.onnx" in cache
    build(art, max_context=64, max_image_tokens=16)
    assert (art / "engines" / "timing.cache").read_bytes().count(b"decoder.onnx") == 2  # grown, not restarted
    fake.install(monkeypatch, fake.FakeDevice(capability=(9, 0)))
    build(art, max_context=64, max_image_tokens=16)
    assert "another TensorRT version or GPU" in capsys.readouterr().err


def test_device_parity_line_without_fixtures(art, monkeypatch, capsys):
    fake.install(monkeypatch)
    shutil.rmtree(art / "fixtures")
    m = load_manifest(art, verify=False)
    write_manifest(art, m)
    path = build(art, max_context=64, max_image_tokens=16)
    out = capsys.readouterr().out.splitlines()
    assert "TensorRT device parity: not run (the artifact has no fixtures (fixtures/fixtures.json))" in out
    assert load_manifest(art).device_parity[path.name]["run"] is False
    assert parity_line({"run": False}, "x") == "TensorRT device parity: not run (no fixture fitted the caps)"


def test_op_check_tables_for_each_version():
    assert [check_table(v) for v in ("10.3", "10.7", "10.15", "10.16", "11", "11.2")] == [
        "10.3", "10.3", "10.15", "10.15", "11", "11"]
    with pytest.raises(ConfigError, match="10.3 or newer"):
        check_table("10.2")


def test_bad_arguments_are_refused(art, monkeypatch):
    fake.install(monkeypatch)
    for kwargs, match in (({"preset": "jetson-tx2"}, "--preset"), ({"max_context": 0}, "--max-context"),
                          ({"opt_level": 7}, "--opt-level"), ({"workspace_gib": 0}, "--workspace-gib")):
        with pytest.raises(ConfigError, match=match):
            build(art, **kwargs)


def test_cli_build(art, monkeypatch):
    from click.testing import CliRunner

    from vlsi_cli import main

    fake.install(monkeypatch)
    res = CliRunner().invoke(main, ["build", str(art), "--max-context", "128", "--max-image-tokens", "32",
                                    "--opt-level", "2"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert any(line.startswith("TensorRT device parity: ") for line in lines)
    assert lines[-1].startswith("wrote ") and lines[-1].endswith("trt10.3_sm87")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    res = CliRunner().invoke(main, ["build", str(art)])
    assert res.exit_code == 2 and res.output.startswith("error: TensorRT cannot be imported")
    assert len(res.output.strip().splitlines()) == 1


# ------------------------------------------------------------------ real TensorRT (skips here)
@pytest.mark.tensorrt
def test_real_tensorrt_builds_and_answers(request, tmp_path):
    # hardware: TensorRT builds and runs only with an NVIDIA GPU and its driver, which this
    # project's CPU machines do not have (checked before the export fixture: nothing is built to skip)
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        pytest.skip(f"needs TensorRT and an NVIDIA GPU: TensorRT is not installed ({e}); {install_hint()}")
    if not Path("/dev/nvidia0").exists() and not Path("/dev/nvhost-ctrl").exists():
        pytest.skip("needs an NVIDIA GPU (no /dev/nvidia0 or Jetson /dev/nvhost-ctrl): TensorRT cannot create a builder")
    folder = shutil.copytree(request.getfixturevalue("artifact"), tmp_path / "a")
    path = build(folder, max_context=256, max_image_tokens=64)
    dp = load_manifest(folder).device_parity[path.name]
    assert dp["run"] and dp["metrics"]["top1"] >= 0.9, dp["metrics"]
    rt = TensorRTRuntime(folder, engine="tensorrt")
    ort = TensorRTRuntime(folder, engine="onnxruntime")
    for images, prompt in PROMPTS:
        a, b = rt.logits(images, prompt)[0]["final"], ort.logits(images, prompt)[0]["final"]
        assert int(np.argmax(a)) == int(np.argmax(b))
        assert float(np.abs(a - b).max()) < 0.1
