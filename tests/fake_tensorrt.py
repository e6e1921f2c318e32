"""A fake ``tensorrt`` module and a host-memory GPU, so that the real engine runner and the real
``vlsi build`` run here, without a GPU, and are held to TensorRT's call contract.

What is faked is only what TensorRT would compute: a "plan" names its ONNX file and records
the profiles it was built with, and ``execute_async_v3`` runs that file with ONNX Runtime on
the bytes behind the bound addresses, writing the outputs into the bound output buffers. So
the engine runner's buffers, ping-pong KV cache, profiles and copies all have to be right
for the tokens to come out right.

What is enforced (a :class:`ContractError` on violation, never a silent pass):

- per call, every input shape is set before any address, and every input and output is
  bound before ``execute_async_v3`` (this fake forgets shapes and addresses after each run,
  so a runner relying on leftovers fails);
- shapes lie within the min/max of the context's own optimisation profile; each context is
  set to its profile once, and no two contexts of an engine share a profile;
- a ``USER_MANAGED`` context has device memory of the profile's size before it runs;
- addresses point into live device allocations large enough for the tensor; an output's
  buffer never overlaps an input's (a present KV written over its own past);
- ``execute_async_v3`` runs on the device's stream;
- building: strongly typed networks (``STRONGLY_TYPED`` when the enum has it), every input
  shaped in every profile with min <= opt <= max, and none of the APIs TensorRT 11 removed
  (precision ``BuilderFlag``\\ s, ``EXPLICIT_BATCH``, ``create_execution_context_without_device_memory``,
  ``device_memory_size``, and the 8.x binding API) is even looked up.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np

PLAN_MAGIC = b"FAKEPLAN\n"
CACHE_MAGIC = b"FAKECACHE\n"


class ContractError(AssertionError):
    """The code under test broke TensorRT's call contract."""


# ---------------------------------------------------------------------------------- enums
class _Member:
    def __init__(self, owner: str, name: str, value: int):
        self.owner, self.name, self.value = owner, name, value

    def __int__(self):
        return self.value

    def __index__(self):
        return self.value

    def __eq__(self, other):
        return isinstance(other, _Member) and (self.owner, self.value) == (other.owner, other.value)

    def __hash__(self):
        return hash((self.owner, self.value))

    def __repr__(self):
        return f"{self.owner}.{self.name}"


class _Trap(type):
    """Looking up a removed member raises (hasattr included): calling code must not touch it."""

    def __getattr__(cls, name):
        if name in cls.__dict__.get("_removed", ()):
            raise ContractError(f"{cls.__name__}.{name} was removed in TensorRT 11 (or 10); do not use it")
        raise AttributeError(name)


def _enum(name: str, members: dict[str, int], removed=()) -> type:
    ns = {k: _Member(name, k, v) for k, v in members.items()}
    ns["_removed"] = frozenset(removed)
    return _Trap(name, (), ns)


REMOVED_FLAGS = ("FP16", "INT8", "INT4", "BF16", "FP8", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                 "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO", "STRICT_TYPES")


class _Guarded:
    """Objects whose removed methods raise when looked up."""

    _removed: tuple = ()

    def __getattr__(self, name):
        if name in type(self)._removed:
            raise ContractError(f"{type(self).__name__}.{name} was removed from TensorRT; do not use it")
        raise AttributeError(name)


# ---------------------------------------------------------------------------------- device
class FakeDevice:
    """:class:`vlsi_runtimes.tensorrt_engine.Device` over host memory, with traffic counters."""

    kind = "fake"

    def __init__(self, capability=(8, 7), name="Fake Jetson Orin"):
        self.capability = tuple(capability)
        self.name = name
        self.memory: dict[int, np.ndarray] = {}
        self._next = 1 << 24
        self.htod_bytes = 0
        self.dtoh_bytes = 0
        self.allocs = 0

    @property
    def sm(self) -> int:
        return self.capability[0] * 10 + self.capability[1]

    @property
    def stream(self) -> int:
        return 0x5EED

    def alloc(self, nbytes):
        nbytes = max(int(nbytes), 1)
        ptr = self._next
        self._next += (nbytes + 4095) // 4096 * 4096 + 4096  # a gap: overruns do not land in a neighbour
        self.memory[ptr] = np.zeros(nbytes, np.uint8)
        self.allocs += 1
        return ptr

    def free(self, ptr):
        if ptr not in self.memory:
            raise ContractError(f"free of {ptr:#x}, which is not a live allocation")
        del self.memory[ptr]

    def region(self, ptr: int, nbytes: int) -> np.ndarray:
        """The bytes ``[ptr, ptr + nbytes)``, which must lie in one live allocation."""
        for base, buf in self.memory.items():
            if base <= ptr < base + buf.size or (nbytes == 0 and ptr == base):
                if ptr + nbytes > base + buf.size:
                    raise ContractError(f"{nbytes} bytes at {ptr:#x} overrun the allocation at {base:#x} "
                                        f"({buf.size} bytes)")
                return buf[ptr - base: ptr - base + nbytes]
        raise ContractError(f"address {ptr:#x} is not in any live device allocation")

    def htod(self, ptr, array):
        array = np.ascontiguousarray(array)
        self.region(ptr, array.nbytes)[:] = array.reshape(-1).view(np.uint8)
        self.htod_bytes += array.nbytes

    def dtoh(self, ptr, shape, dtype):
        dtype = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        self.dtoh_bytes += n
        return self.region(ptr, n).copy().view(dtype).reshape(tuple(shape))

    def synchronize(self):
        pass


# ---------------------------------------------------------------------------------- module
def make_module(device: FakeDevice, version: str = "10.3.0.30", strongly_typed_flag: bool = True,
                user_managed: bool = True, memory_v2: bool = True, fail_parse: str | None = None,
                fail_build: bool = False) -> types.ModuleType:
    """A fresh fake ``tensorrt``. ``strongly_typed_flag=False``: no ``STRONGLY_TYPED`` member
    (the network is strongly typed anyway, flags must be 0); ``user_managed=False`` /
    ``memory_v2=False``: a TensorRT without ``USER_MANAGED`` contexts or the ``*_v2`` memory
    queries (10.0); ``fail_parse``: the parser's error; ``fail_build``: the builder returns None."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.__file__ = __file__
    trt.calls = []  # (what, details) of every build and run, for tests to inspect
    major_minor = ".".join(version.split(".")[:2])

    Severity = _enum("Severity", {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3, "VERBOSE": 4})

    class ILogger:
        pass

    ILogger.Severity = Severity

    class Logger(ILogger):
        def __init__(self, min_severity=Severity.WARNING):
            self.min_severity = min_severity
            self.errors = []

        def log(self, severity, msg):
            if int(severity) <= 1:
                self.errors.append(msg)

    DataType = _enum("DataType", {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4, "UINT8": 5, "FP8": 6,
                                  "BF16": 7, "INT64": 8, "INT4": 9})
    onnx_to_trt = {1: DataType.FLOAT, 10: DataType.HALF, 3: DataType.INT8, 6: DataType.INT32, 9: DataType.BOOL,
                   2: DataType.UINT8, 7: DataType.INT64, 16: DataType.BF16}
    trt_to_np = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
                 DataType.INT32: np.int32, DataType.BOOL: np.bool_, DataType.UINT8: np.uint8,
                 DataType.INT64: np.int64}
    TensorIOMode = _enum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
    flags = {"STRONGLY_TYPED": 1} if strongly_typed_flag else {}
    NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", flags, removed=("EXPLICIT_BATCH",
                                                                                            "EXPLICIT_PRECISION"))
    BuilderFlag = _enum("BuilderFlag", {"DEBUG": 20, "REFIT": 4, "MONITOR_MEMORY": 23}, removed=REMOVED_FLAGS)
    MemoryPoolType = _enum("MemoryPoolType", {"WORKSPACE": 0, "DLA_MANAGED_SRAM": 1, "TACTIC_SHARED_MEMORY": 4})
    strategies = {"STATIC": 0, "ON_PROFILE_CHANGE": 1}
    if user_managed:
        strategies["USER_MANAGED"] = 2
    ExecutionContextAllocationStrategy = _enum("ExecutionContextAllocationStrategy", strategies)
    USER = getattr(ExecutionContextAllocationStrategy, "USER_MANAGED", None)

    # ------------------------------------------------------------------ building
    class ITensor:
        def __init__(self, name, shape, dtype):
            self.name, self.shape, self.dtype = name, tuple(shape), dtype

    class INetworkDefinition(_Guarded):
        _removed = ("has_implicit_batch_dimension", "add_plugin_v2_ext")

        def __init__(self, flags):
            self.flags = flags
            self.inputs, self.outputs, self.onnx = [], [], None

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

        @property
        def num_outputs(self):
            return len(self.outputs)

        def get_output(self, i):
            return self.outputs[i]

    class _ParserError:
        def __init__(self, desc):
            self._desc = desc

        def desc(self):
            return self._desc

        def __str__(self):
            return f"In node 0 (parseGraph): {self._desc}"

    class OnnxParser:
        def __init__(self, network, logger):
            if not isinstance(network, INetworkDefinition):
                raise ContractError("OnnxParser takes the network made by Builder.create_network")
            self.network, self.logger, self.errors = network, logger, []

        def parse_from_file(self, path):
            import onnx

            path = Path(path)
            if not path.is_file():
                self.errors.append(_ParserError(f"file {path} not found"))
                return False
            model = onnx.load(str(path), load_external_data=False)
            if fail_parse:
                self.errors.append(_ParserError(fail_parse))
                return False
            bad = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
            if bad:
                self.errors.append(_ParserError(f"No importer registered for op: {bad[0]}"))
                return False
            for t in model.graph.initializer:  # external data must sit beside the file
                for e in t.external_data:
                    if e.key == "location" and not (path.parent / e.value).is_file():
                        self.errors.append(_ParserError(f"external data {e.value} not found"))
                        return False

            def tensor(v):
                tt = v.type.tensor_type
                return ITensor(v.name, [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim],
                               onnx_to_trt[tt.elem_type])

            self.network.inputs = [tensor(v) for v in model.graph.input]
            self.network.outputs = [tensor(v) for v in model.graph.output]
            self.network.onnx = str(path.resolve())
            trt.calls.append(("parse", str(path)))
            return True

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    class IOptimizationProfile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, min, opt, max):  # noqa: A002  (TensorRT's own keyword names)
            lo, mid, hi = tuple(min), tuple(opt), tuple(max)
            if not (len(lo) == len(mid) == len(hi)):
                raise ContractError(f"profile shapes of {name} differ in rank: {lo} {mid} {hi}")
            if not all(a <= b <= c for a, b, c in zip(lo, mid, hi)) or any(a < 0 for a in lo):
                raise ContractError(f"profile of {name} is not min <= opt <= max: {lo} {mid} {hi}")
            self.shapes[name] = (lo, mid, hi)

    class ITimingCache:
        def __init__(self, key, entries):
            self.key, self.entries = key, entries

        def serialize(self):
            return CACHE_MAGIC + json.dumps({"key": self.key, "entries": self.entries}).encode()

    cache_key = f"{major_minor}/sm{device.sm}"

    class IBuilderConfig(_Guarded):
        _removed = ("max_workspace_size", "int8_calibrator", "set_quantization_flag", "set_calibration_profile",
                    "algorithm_selector")

        def __init__(self):
            self.profiles, self.flags_set, self.pools = [], [], {}
            self._level = 3
            self.cache = None

        @property
        def builder_optimization_level(self):
            return self._level

        @builder_optimization_level.setter
        def builder_optimization_level(self, v):
            if not 0 <= int(v) <= 5:
                raise ContractError(f"builder_optimization_level {v} is not 0-5")
            self._level = int(v)

        def set_memory_pool_limit(self, pool, size):
            if not isinstance(pool, _Member) or pool.owner != "MemoryPoolType":
                raise ContractError(f"set_memory_pool_limit takes a MemoryPoolType, not {pool!r}")
            self.pools[pool.name] = int(size)

        def set_flag(self, flag):
            if not isinstance(flag, _Member) or flag.owner != "BuilderFlag":
                raise ContractError(f"set_flag takes a BuilderFlag, not {flag!r}")
            self.flags_set.append(flag.name)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            data = bytes(data)
            if not data:
                return ITimingCache(cache_key, [])
            if not data.startswith(CACHE_MAGIC):
                return None
            d = json.loads(data[len(CACHE_MAGIC):])
            return ITimingCache(d["key"], d["entries"])

        def set_timing_cache(self, cache, ignore_mismatch):
            if cache.key != cache_key and not ignore_mismatch:
                return False
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder(_Guarded):
        _removed = ("build_engine", "max_batch_size", "platform_has_fast_fp16", "platform_has_fast_int8",
                    "create_builder_config_v2")

        def __init__(self, logger):
            if not isinstance(logger, ILogger):
                raise ContractError("Builder takes a tensorrt.ILogger")
            self.logger = logger

        def create_network(self, flags=0):
            st = 1 << 1 if strongly_typed_flag else 0
            if flags & ~st:
                raise ContractError(f"create_network flags {flags:#b} carry a removed flag (only STRONGLY_TYPED)")
            if strongly_typed_flag and not flags & st:
                raise ContractError("the network must be created STRONGLY_TYPED (precision lives in the graph)")
            return INetworkDefinition(flags)

        def create_builder_config(self):
            return IBuilderConfig()

        def create_optimization_profile(self):
            return IOptimizationProfile()

        def build_serialized_network(self, network, config):
            if network.onnx is None:
                raise ContractError("build_serialized_network on a network nothing was parsed into")
            if not config.profiles:
                raise ContractError("a network with dynamic inputs needs an optimisation profile")
            if config.cache is None:
                raise ContractError("build without a timing cache (vlsi always sets one)")
            profiles = []
            for p in config.profiles:
                shapes = {}
                for t in network.inputs:
                    if t.name not in p.shapes:
                        raise ContractError(f"input {t.name} has no shape in an optimisation profile")
                    lo, opt, hi = p.shapes[t.name]
                    if len(lo) != len(t.shape) or any(d >= 0 and (a, c) != (d, d) for d, a, c in zip(t.shape, lo, hi)):
                        raise ContractError(f"profile of {t.name} {lo}..{hi} does not fit its shape {t.shape}")
                    shapes[t.name] = [list(lo), list(opt), list(hi)]
                profiles.append(shapes)
            trt.calls.append(("build", {"onnx": network.onnx, "flags": config.flags_set, "pools": config.pools,
                                        "level": config.builder_optimization_level, "profiles": len(profiles)}))
            if fail_build:
                self.logger.log(Severity.ERROR, "fake: out of memory while building")
                return None
            config.cache.entries.append(Path(network.onnx).name)
            io = [{"name": t.name, "mode": "INPUT", "dtype": t.dtype.name, "shape": list(t.shape)} for t in network.inputs]
            io += [{"name": t.name, "mode": "OUTPUT", "dtype": t.dtype.name, "shape": list(t.shape)}
                   for t in network.outputs]
            body = {"onnx": network.onnx, "version": major_minor, "sm": device.sm, "profiles": profiles, "io": io}
            return PLAN_MAGIC + json.dumps(body).encode()

    # ------------------------------------------------------------------ running
    sessions: dict[str, object] = {}

    def session(path):
        if path not in sessions:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            sessions[path] = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        return sessions[path]

    def symbolic_dims(path):
        import onnx

        m = onnx.load(path, load_external_data=False)
        return {v.name: [d.dim_param if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in [*m.graph.input, *m.graph.output]}

    class IExecutionContext(_Guarded):
        _removed = ("execute_async_v2", "execute_v2", "set_binding_shape", "get_binding_shape",
                    "all_binding_shapes_specified", "active_optimization_profile_v1", "device_memory")

        def __init__(self, engine, strategy):
            self.engine, self.strategy = engine, strategy
            self.profile = None
            self.memory = None
            self.runs = 0
            self._reset()

        def _reset(self):
            self.shapes, self.addresses = {}, {}

        def set_device_memory(self, memory, size):
            if USER is None or self.strategy != USER:
                raise ContractError("set_device_memory on a context not created USER_MANAGED")
            device.region(int(memory), int(size))
            self.memory = (int(memory), int(size))

        def set_optimization_profile_async(self, index, stream):
            if self.profile is not None:
                raise ContractError(f"this context is already set to profile {self.profile}: one profile per context")
            if not 0 <= index < len(self.engine.profiles):
                raise ContractError(f"profile {index} does not exist ({len(self.engine.profiles)} profiles)")
            if index in [c.profile for c in self.engine.contexts]:
                raise ContractError(f"profile {index} already belongs to another context of this engine")
            if stream != device.stream:
                raise ContractError("set_optimization_profile_async on another stream")
            self.profile = index
            return True

        @property
        def active_optimization_profile(self):
            return self.profile

        def set_input_shape(self, name, shape):
            if self.profile is None:
                raise ContractError("set_input_shape before set_optimization_profile_async")
            if self.engine.mode(name) != "INPUT":
                raise ContractError(f"set_input_shape on {name}, which is not an input")
            if self.addresses:
                raise ContractError(f"the shape of {name} is set after the address of {next(iter(self.addresses))}: "
                                    "set every input shape first")
            shape = tuple(int(d) for d in shape)
            lo, _, hi = self.engine.profiles[self.profile][name]
            if len(shape) != len(lo) or not all(a <= d <= c for a, d, c in zip(lo, shape, hi)):
                raise ContractError(f"{name} shape {shape} is outside profile {self.profile} ({tuple(lo)} to "
                                    f"{tuple(hi)}) of this context")
            self.shapes[name] = shape
            return True

        def _bindings(self):
            """Symbol -> value from the input shapes set in this call."""
            missing = [n for n in self.engine.inputs if n not in self.shapes]
            if missing:
                raise ContractError(f"input shapes of {missing[:3]} not set in this call")
            env = {}
            for n in self.engine.inputs:
                for sym, d in zip(self.engine.symbols[n], self.shapes[n]):
                    if isinstance(sym, str):
                        env[sym] = d
            return env

        def get_tensor_shape(self, name):
            if self.engine.mode(name) == "INPUT":
                return self.shapes.get(name, tuple(self.engine.shape(name)))
            env = self._bindings()
            return tuple(int(eval(d, {"__builtins__": {}}, env)) if isinstance(d, str) else int(d)  # noqa: S307
                         for d in self.engine.symbols[name])

        def set_tensor_address(self, name, ptr):
            self.engine.mode(name)
            missing = [n for n in self.engine.inputs if n not in self.shapes]
            if missing:
                raise ContractError(f"the address of {name} is set before the shape of {missing[0]}: "
                                    "set every input shape first, then the addresses")
            device.region(int(ptr), 0)
            self.addresses[name] = int(ptr)
            return True

        def execute_async_v3(self, stream_handle):
            try:
                return self._execute(stream_handle)
            finally:  # a call is over, run or refused: the next one sets shapes and addresses again
                self._reset()

        def _execute(self, stream_handle):
            eng = self.engine
            if stream_handle != device.stream:
                raise ContractError("execute_async_v3 on another stream than the device's")
            if self.profile is None:
                raise ContractError("execute before set_optimization_profile_async")
            if self.strategy == USER:
                need = eng.memory_for(self.profile)
                if self.memory is None or self.memory[1] < need:
                    raise ContractError(f"USER_MANAGED context runs without {need} bytes of device memory")
            unbound = [n for n in eng.names if n not in self.addresses]
            if unbound:
                raise ContractError(f"execute_async_v3 with {unbound[:3]} not bound in this call")
            feeds, spans = {}, []
            for n in eng.inputs:
                dt = np.dtype(trt_to_np[eng.dtype(n)])
                size = int(np.prod(self.shapes[n], dtype=np.int64)) * dt.itemsize
                feeds[n] = device.region(self.addresses[n], size).copy().view(dt).reshape(self.shapes[n])
                spans.append((n, self.addresses[n], size))
            out_shapes = {n: self.get_tensor_shape(n) for n in eng.outputs}
            for n in eng.outputs:
                dt = np.dtype(trt_to_np[eng.dtype(n)])
                size = int(np.prod(out_shapes[n], dtype=np.int64)) * dt.itemsize
                device.region(self.addresses[n], size)
                a = self.addresses[n]
                for other, b, bs in spans:
                    if size and bs and a < b + bs and b < a + size:
                        raise ContractError(f"output {n} is bound over input {other}: it would overwrite it while "
                                            "the engine reads it")
                spans.append((n, a, size))
            results = session(eng.onnx).run(eng.outputs, feeds)
            for n, r in zip(eng.outputs, results):
                if tuple(r.shape) != out_shapes[n]:
                    raise ContractError(f"{n}: the graph made {r.shape}, get_tensor_shape said {out_shapes[n]}")
                r = np.ascontiguousarray(r, trt_to_np[eng.dtype(n)])
                device.region(self.addresses[n], r.nbytes)[:] = r.reshape(-1).view(np.uint8)
            trt.calls.append(("execute", {"onnx": Path(eng.onnx).name, "profile": self.profile,
                                          "shapes": dict(self.shapes)}))
            self.runs += 1
            return True

    class ICudaEngine(_Guarded):
        _removed = ("create_execution_context_without_device_memory", "device_memory_size", "num_bindings",
                    "get_binding_name", "get_binding_shape", "binding_is_input", "max_batch_size",
                    "get_device_memory_size_for_profile")

        def __init__(self, body):
            self.onnx = body["onnx"]
            self.io = {t["name"]: t for t in body["io"]}
            self.names = [t["name"] for t in body["io"]]
            self.inputs = [t["name"] for t in body["io"] if t["mode"] == "INPUT"]
            self.outputs = [t["name"] for t in body["io"] if t["mode"] == "OUTPUT"]
            self.profiles = body["profiles"]
            self.symbols = symbolic_dims(self.onnx)
            self.contexts = []

        def mode(self, name):
            if name not in self.io:
                raise ContractError(f"{name} is not an I/O tensor of this engine")
            return self.io[name]["mode"]

        def dtype(self, name):
            return getattr(DataType, self.io[name]["dtype"])

        def shape(self, name):
            return self.io[name]["shape"]

        @property
        def num_io_tensors(self):
            return len(self.names)

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return getattr(TensorIOMode, self.mode(name))

        def get_tensor_dtype(self, name):
            self.mode(name)
            return self.dtype(name)

        def get_tensor_shape(self, name):
            return tuple(self.shape(name))

        @property
        def num_optimization_profiles(self):
            return len(self.profiles)

        def get_tensor_profile_shape(self, name, index):
            return [tuple(s) for s in self.profiles[index][name]]

        def memory_for(self, index):
            return 4096 * (index + 1)

        def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
            ctx = IExecutionContext(self, strategy)
            self.contexts.append(ctx)
            return ctx

    if memory_v2:
        ICudaEngine.get_device_memory_size_for_profile_v2 = lambda self, i: self.memory_for(i)
        ICudaEngine.device_memory_size_v2 = property(lambda self: max(self.memory_for(i)
                                                                      for i in range(len(self.profiles))))
    else:  # 10.0: no set_device_memory(ptr, size) either
        del IExecutionContext.set_device_memory

    class Runtime(_Guarded):
        _removed = ("deserialize_cuda_engine_v1",)

        def __init__(self, logger):
            if not isinstance(logger, ILogger):
                raise ContractError("Runtime takes a tensorrt.ILogger")
            self.logger = logger

        def deserialize_cuda_engine(self, plan):
            plan = bytes(plan)
            if not plan.startswith(PLAN_MAGIC):
                self.logger.log(Severity.ERROR, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization "
                                                "(Serialization assertion magicTagRead == kMAGIC_TAG failed.)")
                return None
            body = json.loads(plan[len(PLAN_MAGIC):])
            if (body["version"], body["sm"]) != (major_minor, device.sm):
                self.logger.log(Severity.ERROR, f"Error Code 6: API Usage Error (The engine plan file is not "
                                                f"compatible with this version of TensorRT or GPU: built for "
                                                f"{body['version']}/sm{body['sm']})")
                return None
            trt.calls.append(("deserialize", Path(body["onnx"]).name))
            return ICudaEngine(body)

    for name, obj in dict(locals()).items():
        if name[0].isupper() and isinstance(obj, type):
            setattr(trt, name, obj)
    return trt


def install(monkeypatch, device: FakeDevice | None = None, **options):
    """Put a fresh fake ``tensorrt`` in ``sys.modules`` and make ``device`` (default: a fake
    Orin, SM 8.7) the engine runner's default; returns ``(module, device)``."""
    import sys

    from vlsi_runtimes import tensorrt_engine

    device = device or FakeDevice()
    trt = make_module(device, **options)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(tensorrt_engine, "default_device", lambda: device)
    return trt, device
