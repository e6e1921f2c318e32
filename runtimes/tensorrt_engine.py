"""TensorRT's Python API over the engines ``vlsi build`` made: the :class:`GraphRunner` of the
TensorRT backend.

The generation loop (prompt and image splicing, rotary tables, context limits, verbalizers)
is :class:`~vlsi_runtimes.tensorrt_backend.TensorRTRuntime`'s, shared with ONNX Runtime; this
module only executes the two graphs, and keeps what it can on the GPU:

- the **KV cache stays on the device**. Each layer has two key and two value buffers of the
  engines' full context; a step reads the past from one (bound with shape ``P``) and writes the
  present into the other (shape ``P + L``), then the two swap. Both are dense in their own
  shape, so nothing is copied or re-laid out between steps: only the new embeddings, the mask,
  the rotary tables and the logits cross the bus;
- **one execution context per optimisation profile** (the decoder's ``prefill`` and
  ``decode``), each set to its profile once. When this TensorRT can (10.1+), the contexts are
  created ``USER_MANAGED`` and share one scratch block sized for the largest profile: they
  never run at the same time (one stream);
- every call sets **every input shape first**, then every input and output address, then
  ``execute_async_v3`` — the order TensorRT 10.x and 11.x require. Nothing here uses an API
  that 11.0 removed (precision builder flags, ``EXPLICIT_BATCH``,
  ``create_execution_context_without_device_memory``, ``device_memory_size``).

GPU memory is reached without torch, through a small :class:`Device`: NVIDIA's
``cuda-python`` when installed, else polygraphy's ctypes wrapper over ``libcudart``. The tests
run this very code against a fake ``tensorrt`` module and a host-memory device
(``tests/fake_tensorrt.py``). Torch-free.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import sys
from pathlib import Path

import numpy as np

from vlsi.errors import VLsIError
from vlsi.manifest import ArtifactError

ENGINES = "engines"
"""The artifact's folder of built engines (not part of the exported, hashed payload)."""
RECORD = "build.json"
"""Inside each ``engines/<dir>/``: what was built, for which TensorRT and GPU, with which caps."""
PLANS = {"vision": "vision.plan", "decoder": "decoder.plan"}


class EngineError(VLsIError):
    """TensorRT engines are missing, built for another TensorRT or GPU, or do not load."""


# ---------------------------------------------------------------------------------- naming
def tensorrt_version(trt) -> str:
    """``"10.3"`` from ``tensorrt.__version__ == "10.3.0.30"``: engines are tied to major.minor."""
    parts = str(trt.__version__).split(".")
    return ".".join(parts[:2])


def engine_dir_name(version: str, capability: tuple[int, int]) -> str:
    """``trt10.3_sm87``: the folder under ``engines/`` for a TensorRT version and a GPU."""
    return f"trt{version}_sm{capability[0]}{capability[1]}"


def import_tensorrt():
    """``tensorrt``, or an :class:`EngineError` saying how to install it."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: the package is there, libnvinfer is not
        from .tensorrt_backend import install_hint

        raise EngineError(f"TensorRT cannot be imported ({e}); {install_hint()}") from None
    return trt


# ---------------------------------------------------------------------------------- devices
class Device:
    """Device memory and one stream, for the engines' buffers. ``alloc`` returns a device
    pointer (int); ``htod`` enqueues a copy on the stream (the host array is kept alive until
    the next :meth:`synchronize`); ``dtoh`` copies back and waits for the stream."""

    kind = "base"
    name = "GPU"
    capability: tuple[int, int] = (0, 0)
    """Compute capability as (major, minor): (8, 7) for Orin."""

    @property
    def stream(self) -> int:
        """The stream handle TensorRT's ``*_async`` calls take."""
        raise NotImplementedError

    def alloc(self, nbytes: int) -> int:
        raise NotImplementedError

    def free(self, ptr: int) -> None:
        raise NotImplementedError

    def htod(self, ptr: int, array: np.ndarray) -> None:
        raise NotImplementedError

    def dtoh(self, ptr: int, shape, dtype) -> np.ndarray:
        raise NotImplementedError

    def synchronize(self) -> None:
        raise NotImplementedError

    @property
    def sm(self) -> int:
        return self.capability[0] * 10 + self.capability[1]


class CudaPythonDevice(Device):
    """NVIDIA's ``cuda-python`` (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6)."""

    kind = "cuda-python"

    def __init__(self, ordinal: int | None = None):
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # older cuda-python layout; ImportError if not installed
        self.rt = cudart
        if ordinal is not None:
            self._call(cudart.cudaSetDevice(ordinal), "cudaSetDevice")
        (dev,) = self._call(cudart.cudaGetDevice(), "cudaGetDevice")
        (prop,) = self._call(cudart.cudaGetDeviceProperties(dev), "cudaGetDeviceProperties")
        self.capability = (int(prop.major), int(prop.minor))
        raw = prop.name
        self.name = (raw.split(b"\0")[0].decode(errors="replace") if isinstance(raw, bytes) else str(raw)).strip()
        (self._stream,) = self._call(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._keep: list[np.ndarray] = []

    def _call(self, result, what: str):
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            _, msg = self.rt.cudaGetErrorString(err)
            raise EngineError(f"CUDA {what} failed: {msg.decode() if isinstance(msg, bytes) else msg} "
                              f"(is a GPU visible to this process? check nvidia-smi / tegrastats)")
        return values

    @property
    def stream(self) -> int:
        return int(self._stream)

    def alloc(self, nbytes):
        (ptr,) = self._call(self.rt.cudaMalloc(max(int(nbytes), 1)), f"cudaMalloc({nbytes})")
        return int(ptr)

    def free(self, ptr):
        self._call(self.rt.cudaFree(ptr), "cudaFree")

    def htod(self, ptr, array):
        array = np.ascontiguousarray(array)
        if array.nbytes:
            self._call(self.rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes,
                                               self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream),
                       "cudaMemcpyAsync (host to device)")
            self._keep.append(array)

    def dtoh(self, ptr, shape, dtype):
        out = np.empty(tuple(shape), dtype)
        if out.nbytes:
            self._call(self.rt.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes,
                                               self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream),
                       "cudaMemcpyAsync (device to host)")
        self.synchronize()
        return out

    def synchronize(self):
        self._call(self.rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        self._keep.clear()


class PolygraphyDevice(Device):
    """polygraphy's ``polygraphy.cuda`` (plain ctypes over ``libcudart``): ``pip install polygraphy``."""

    kind = "polygraphy"
    _MAJOR, _MINOR = 75, 76  # cudaDevAttrComputeCapabilityMajor / Minor

    def __init__(self):
        from polygraphy import cuda as pcuda  # ImportError if not installed

        try:
            self.cuda = pcuda.wrapper()
            self.kinds = pcuda.MemcpyKind
            self._stream = pcuda.Stream()
            lib = self.cuda.handle
            dev = ctypes.c_int(0)
            self._status(lib.cudaGetDevice(ctypes.byref(dev)), "cudaGetDevice")
            major, minor = ctypes.c_int(0), ctypes.c_int(0)
            self._status(lib.cudaDeviceGetAttribute(ctypes.byref(major), self._MAJOR, dev), "cudaDeviceGetAttribute")
            self._status(lib.cudaDeviceGetAttribute(ctypes.byref(minor), self._MINOR, dev), "cudaDeviceGetAttribute")
        except EngineError:
            raise
        except Exception as e:  # polygraphy raises its own exception type on CUDA errors
            raise EngineError(f"CUDA through polygraphy failed: {str(e).splitlines()[0] if str(e) else e!r} "
                              "(is a GPU visible to this process? check nvidia-smi / tegrastats)") from None
        self.capability = (major.value, minor.value)
        self.name = self._device_name(lib, dev)
        self._keep: list[np.ndarray] = []

    @staticmethod
    def _status(code: int, what: str) -> None:
        if code != 0:
            raise EngineError(f"CUDA {what} failed with error {code} (is a GPU visible to this process?)")

    @staticmethod
    def _device_name(lib, dev) -> str:
        """``cudaDeviceProp`` begins with ``char name[256]`` in every CUDA version; the rest of the
        struct changes size, so a generous buffer is passed."""
        buf = ctypes.create_string_buffer(16384)
        for fn in ("cudaGetDeviceProperties_v2", "cudaGetDeviceProperties"):
            f = getattr(lib, fn, None)
            if f is not None and f(buf, dev) == 0:
                return buf.raw[:256].split(b"\0")[0].decode(errors="replace").strip() or "GPU"
        return "GPU"

    @property
    def stream(self) -> int:
        return int(self._stream.ptr)

    def _guard(self, fn, *args, what: str):
        try:
            return fn(*args)
        except Exception as e:
            raise EngineError(f"CUDA {what} failed: {str(e).splitlines()[0] if str(e) else e!r}") from None

    def alloc(self, nbytes):
        return int(self._guard(self.cuda.malloc, max(int(nbytes), 1), what=f"malloc({nbytes})"))

    def free(self, ptr):
        self._guard(self.cuda.free, ptr, what="free")

    def htod(self, ptr, array):
        array = np.ascontiguousarray(array)
        if array.nbytes:
            self._guard(self.cuda.memcpy, ptr, array.ctypes.data, array.nbytes, self.kinds.HostToDevice, self.stream,
                        what="memcpy (host to device)")
            self._keep.append(array)

    def dtoh(self, ptr, shape, dtype):
        out = np.empty(tuple(shape), dtype)
        if out.nbytes:
            self._guard(self.cuda.memcpy, out.ctypes.data, ptr, out.nbytes, self.kinds.DeviceToHost, self.stream,
                        what="memcpy (device to host)")
        self.synchronize()
        return out

    def synchronize(self):
        self._guard(self._stream.synchronize, what="stream synchronize")
        self._keep.clear()


DEVICES = (CudaPythonDevice, PolygraphyDevice)
_default: Device | None = None
_override: list[Device] = []


def default_device() -> Device:
    """The process's device (one stream): :func:`using_device`'s if one is set, else the first of
    ``cuda-python`` and polygraphy that imports."""
    global _default
    if _override:
        return _override[-1]
    if _default is None:
        missing = []
        for cls in DEVICES:
            try:
                _default = cls()
                break
            except (ImportError, OSError) as e:
                missing.append(f"{cls.kind}: {e}")
        else:
            raise EngineError("no Python access to GPU memory (" + "; ".join(missing) + "): "
                              "pip install cuda-python (or pip install polygraphy)")
    return _default


@contextlib.contextmanager
def using_device(device: Device | None):
    """Within the block, :func:`default_device` is ``device`` (``None``: no change)."""
    if device is None:
        yield
        return
    _override.append(device)
    try:
        yield
    finally:
        _override.pop()


# ---------------------------------------------------------------------------------- engines
def find_engines(folder: Path, trt, device: Device, engines: str | Path | None = None) -> Path:
    """The engines folder to load: ``engines`` (a path, or a name under ``ART/engines/``), else
    the one built for this TensorRT version and this GPU; a one-line error naming what exists."""
    root = folder / ENGINES
    version = tensorrt_version(trt)
    want = engine_dir_name(version, device.capability)
    fix = f"run `vlsi build {folder}` on this machine"
    if engines is not None:
        path = Path(engines)
        if not path.is_dir():
            path = root / str(engines)
        if not (path / RECORD).is_file():
            raise EngineError(f"{path} holds no built engines ({RECORD} missing); {fix}")
        return path
    if not root.is_dir():
        raise EngineError(f"{folder} has no TensorRT engines yet: build them on the device with `vlsi build {folder}`")
    if (root / want / RECORD).is_file():
        return root / want
    have = sorted(p.name for p in root.iterdir() if (p / RECORD).is_file())
    if not have:
        raise EngineError(f"{root} holds no built engines (no {RECORD} in any folder); {fix}")
    raise EngineError(f"{root} has engines for {', '.join(have)}, not for TensorRT {version} on this "
                      f"{device.name} (sm{device.sm}, wants {want}): engines do not move between TensorRT versions "
                      f"or GPUs; {fix}")


def read_record(path: Path) -> dict:
    try:
        return json.loads((path / RECORD).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EngineError(f"{path / RECORD} is unreadable ({e}); run `vlsi build` again") from None


def make_logger(trt, level: str = "WARNING"):
    """A TensorRT logger that keeps the errors it saw (for one-line messages) and prints
    warnings and errors to stderr."""
    severity = trt.ILogger.Severity
    shown = int(getattr(severity, level))

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, sev, msg):
            if int(sev) <= int(severity.ERROR):
                self.errors.append(str(msg))
            if int(sev) <= shown:
                print(f"[TensorRT] {msg}", file=sys.stderr)

        def last_error(self) -> str:
            return self.errors[-1].splitlines()[0] if self.errors else "no error logged"

    return _Logger()


def _np_dtypes(trt) -> dict:
    table = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "INT8": np.int8,
             "UINT8": np.uint8, "BOOL": np.bool_}
    out = {}
    for name, np_type in table.items():
        member = getattr(trt.DataType, name, None)
        if member is not None:
            out[member] = np.dtype(np_type)
    return out


class _Buffers:
    """Device buffers by name that grow to the largest size asked (allocated once per size)."""

    def __init__(self, device: Device):
        self.device = device
        self.bufs: dict[str, tuple[int, int]] = {}

    def get(self, name: str, nbytes: int) -> int:
        ptr, cap = self.bufs.get(name, (None, -1))
        if nbytes > cap:
            if ptr is not None:
                self.device.free(ptr)
            cap = max(int(nbytes), 256)
            ptr = self.device.alloc(cap)
            self.bufs[name] = (ptr, cap)
        return ptr

    def free(self):
        for ptr, _ in self.bufs.values():
            self.device.free(ptr)
        self.bufs.clear()


class Engine:
    """One deserialized plan: its I/O tensors (names, modes, dtypes) and one execution context
    per optimisation profile."""

    def __init__(self, trt, runtime, logger, path: Path, device: Device, build_hint: str):
        self.trt, self.device, self.path = trt, device, path
        # mapped, not read: a plan is about the model's size, and a Jetson's host and GPU share memory
        try:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as plan:
                engine = runtime.deserialize_cuda_engine(plan)
        except (OSError, ValueError) as e:  # ValueError: an empty file
            raise EngineError(f"{path} is unreadable ({e}); {build_hint}") from None
        if engine is None:
            raise EngineError(f"{path} does not deserialize on TensorRT {trt.__version__} ({logger.last_error()}): the "
                              f"plan is damaged or from another TensorRT or GPU; {build_hint}")
        self.engine = engine
        dtypes = _np_dtypes(trt)
        self.inputs, self.outputs, self.dtype = [], [], {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            mode = engine.get_tensor_mode(name)
            (self.inputs if mode == trt.TensorIOMode.INPUT else self.outputs).append(name)
            dt = engine.get_tensor_dtype(name)
            if dt not in dtypes:
                raise EngineError(f"{path}: tensor {name} has type {dt}, which this runner does not handle; re-export")
            self.dtype[name] = dtypes[dt]
        self.n_profiles = engine.num_optimization_profiles
        self.scratch = None
        self.contexts = self._contexts()

    def _contexts(self) -> list:
        """One context per profile; with USER_MANAGED memory (TensorRT 10.1+) they share one
        scratch block sized for the largest profile, else each allocates its own."""
        trt, engine, n = self.trt, self.engine, self.n_profiles
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        user = getattr(strategy, "USER_MANAGED", None) if strategy is not None else None
        sizes = None
        if hasattr(engine, "get_device_memory_size_for_profile_v2"):
            sizes = [int(engine.get_device_memory_size_for_profile_v2(i)) for i in range(n)]
        elif hasattr(engine, "device_memory_size_v2"):
            sizes = [int(engine.device_memory_size_v2)] * n
        shared = user is not None and sizes is not None and hasattr(trt.IExecutionContext, "set_device_memory")
        contexts = []
        if shared:
            size = max(sizes)
            self.scratch = (self.device.alloc(size), size)
        for i in range(n):
            ctx = engine.create_execution_context(user) if shared else engine.create_execution_context()
            if ctx is None:
                raise EngineError(f"{self.path}: TensorRT could not create an execution context (out of GPU memory?); "
                                  "close other GPU programs, or rebuild with a smaller --max-context")
            if shared:
                ctx.set_device_memory(self.scratch[0], self.scratch[1])
            if not ctx.set_optimization_profile_async(i, self.device.stream):
                raise EngineError(f"{self.path}: TensorRT refused optimisation profile {i}; rebuild the engines")
            contexts.append(ctx)
        self.device.synchronize()
        return contexts

    def shapes(self, profile: int, shapes: dict[str, tuple]) -> dict[str, tuple]:
        """Set every input's shape on ``profile``'s context (the first step of a call); the output
        shapes TensorRT infers from them."""
        ctx = self.contexts[profile]
        for name in self.inputs:
            shape = tuple(int(d) for d in shapes[name])
            if not ctx.set_input_shape(name, shape):
                lo, _, hi = (tuple(s) for s in self.engine.get_tensor_profile_shape(name, profile))
                raise EngineError(f"{self.path.name}: input {name} of shape {shape} is outside the engine's profile "
                                  f"{profile} ({lo} to {hi}); rebuild with larger caps (`vlsi build --max-context` / "
                                  "`--max-image-tokens`)")
        return {name: tuple(int(d) for d in ctx.get_tensor_shape(name)) for name in self.outputs}

    def execute(self, profile: int, addresses: dict[str, int]) -> None:
        """Bind every input and output, then run on the stream (after :meth:`shapes`)."""
        ctx = self.contexts[profile]
        for name in (*self.inputs, *self.outputs):
            if not ctx.set_tensor_address(name, int(addresses[name])):
                raise EngineError(f"{self.path.name}: TensorRT refused the address of {name}")
        if not ctx.execute_async_v3(self.device.stream):
            raise EngineError(f"{self.path.name}: TensorRT failed to run the engine; see the [TensorRT] lines above")

    def nbytes(self, name: str, shape) -> int:
        return int(np.prod(shape, dtype=np.int64)) * self.dtype[name].itemsize

    def free(self):
        if self.scratch is not None:
            self.device.free(self.scratch[0])
            self.scratch = None


class _KVCache:
    """One sequence's KV cache on the device: per layer, key and value buffers A and B of the
    engines' full context. ``cur`` says which holds the past; the present goes to the other."""

    def __init__(self, runner, buffers):
        self.runner = runner
        self.buffers = buffers  # [layer] -> {"key": (A, B), "value": (A, B)}
        self.length = 0
        self.cur = 0

    def __del__(self):  # the buffers go back to the runner's pool (no CUDA call here)
        try:
            if not self.runner._closed:
                self.runner._pool.append(self.buffers)
        except Exception:
            pass


class EngineRunner:
    """:class:`~vlsi_runtimes.tensorrt_backend.GraphRunner` over TensorRT engines.

    ``engines``: a folder (or its name under ``ART/engines/``); by default the one built for
    this TensorRT version and GPU. ``device``: a :class:`Device` (default: :func:`default_device`)."""

    name = "tensorrt"

    def __init__(self, folder, manifest, engines: str | Path | None = None, device: Device | None = None):
        trt = import_tensorrt()
        self.trt = trt
        self.folder = Path(folder)
        self.device = device or default_device()
        self.engines_dir = find_engines(self.folder, trt, self.device, engines)
        self.record = read_record(self.engines_dir)
        hint = f"run `vlsi build {self.folder}` on this machine"
        version, sm = tensorrt_version(trt), self.device.sm
        built_for = (str(self.record.get("tensorrt", version)), int(self.record.get("sm", sm)))
        if built_for != (version, sm):
            raise EngineError(f"{self.engines_dir} was built for TensorRT {built_for[0]} on sm{built_for[1]}; this is "
                              f"TensorRT {version} on sm{sm} ({self.device.name}): {hint}")
        self.max_context = int(self.record["max_context"])
        self.max_image_tokens = int(self.record["max_image_tokens"])
        m = manifest.model
        self.n_layers, self.kv_heads, self.head_dim = m["num_layers"], m["num_kv_heads"], m["head_dim"]
        self.logger = make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        if self.runtime is None:
            raise EngineError(f"TensorRT could not create a runtime ({self.logger.last_error()}); is a GPU visible?")
        self.engines = {name: Engine(trt, self.runtime, self.logger, self.engines_dir / PLANS[name], self.device, hint)
                        for name in PLANS}
        names = [p["name"] for p in self.record.get("profiles", {}).get("decoder", [])] or ["prefill", "decode"]
        if "prefill" not in names or "decode" not in names or self.engines["decoder"].n_profiles != len(names):
            raise EngineError(f"{self.engines_dir}: the decoder engine's profiles ({names}) are not prefill and "
                              f"decode; {hint}")
        self.prefill, self.decode = names.index("prefill"), names.index("decode")
        dec = self.engines["decoder"]
        self.host_inputs = [n for n in dec.inputs if not n.startswith("past_")]
        self.logit_names = [n for n in dec.outputs if not n.startswith("present_")]
        want = {f"{p}_{kind}_{i}" for p in ("past", "present") for i in range(self.n_layers) for kind in ("key", "value")}
        have = set(dec.inputs) | set(dec.outputs)
        if want - have or "logits" not in self.logit_names:
            raise ArtifactError(f"{dec.path}: the decoder engine lacks {sorted(want - have)[:4] or ['logits']}; "
                                "re-export the artifact and rebuild")
        self.kv_dtype = dec.dtype["past_key_0"]
        self._bufs = _Buffers(self.device)
        self._pool: list = []
        self._all_kv: list[int] = []
        self._closed = False

    # ----------------------------------------------------------------------- GraphRunner
    def vision(self, feeds):
        eng = self.engines["vision"]
        missing = [n for n in eng.inputs if n not in feeds]
        if missing:
            raise ArtifactError(f"the vision engine takes inputs {missing} the architecture's spec did not make; "
                                "re-export the artifact and rebuild")
        arrays = {n: np.ascontiguousarray(feeds[n], eng.dtype[n]) for n in eng.inputs}
        out_shapes = eng.shapes(0, {n: a.shape for n, a in arrays.items()})
        addresses = {}
        for n, a in arrays.items():
            addresses[n] = self._bufs.get(f"vision/{n}", a.nbytes)
            self.device.htod(addresses[n], a)
        for n in eng.outputs:
            addresses[n] = self._bufs.get(f"vision/{n}", eng.nbytes(n, out_shapes[n]))
        eng.execute(0, addresses)
        return self.device.dtoh(addresses["image_embeds"], out_shapes["image_embeds"], eng.dtype["image_embeds"])

    def new_cache(self):
        if self._closed:
            raise EngineError("this TensorRT runner was closed; load the artifact again")
        if self._pool:
            return _KVCache(self, self._pool.pop())
        nbytes = self.kv_heads * self.max_context * self.head_dim * self.kv_dtype.itemsize
        buffers = []
        for _ in range(self.n_layers):
            layer = {}
            for kind in ("key", "value"):
                pair = (self.device.alloc(nbytes), self.device.alloc(nbytes))
                self._all_kv.extend(pair)
                layer[kind] = pair
            buffers.append(layer)
        return _KVCache(self, buffers)

    def decoder(self, cache, feeds):
        eng = self.engines["decoder"]
        past, new = cache.length, int(feeds["inputs_embeds"].shape[1])
        total = past + new
        if total > self.max_context:
            raise EngineError(f"{total} tokens exceed the engines' context of {self.max_context}; rebuild with "
                              "`vlsi build --max-context N`")
        profile = self.prefill if new > 1 or past == 0 else self.decode
        arrays = {n: np.ascontiguousarray(feeds[n], eng.dtype[n]) for n in self.host_inputs}
        shapes = {n: a.shape for n, a in arrays.items()}
        kv_past = (1, self.kv_heads, past, self.head_dim)
        for i in range(self.n_layers):
            shapes[f"past_key_{i}"] = shapes[f"past_value_{i}"] = kv_past
        out_shapes = eng.shapes(profile, shapes)  # 1. every input shape
        kv_present = (1, self.kv_heads, total, self.head_dim)
        addresses = {}
        for n, a in arrays.items():  # sized for the full context once: no allocation per step
            per_token = a.nbytes // max(a.shape[1], 1)
            addresses[n] = self._bufs.get(f"decoder/{n}", max(a.nbytes, per_token * self.max_context))
            self.device.htod(addresses[n], a)
        src, dst = cache.cur, 1 - cache.cur
        for i, layer in enumerate(cache.buffers):
            for kind in ("key", "value"):
                addresses[f"past_{kind}_{i}"] = layer[kind][src]
                addresses[f"present_{kind}_{i}"] = layer[kind][dst]
                if out_shapes[f"present_{kind}_{i}"] != kv_present:
                    raise EngineError(f"{eng.path.name}: present_{kind}_{i} would be {out_shapes[f'present_{kind}_{i}']}, "
                                      f"not {kv_present}; re-export the artifact and rebuild")
        for n in self.logit_names:
            addresses[n] = self._bufs.get(f"decoder/{n}", eng.nbytes(n, out_shapes[n]))
        eng.execute(profile, addresses)  # 2. every address, 3. run
        outs = {n: self.device.dtoh(addresses[n], out_shapes[n], eng.dtype[n]) for n in self.logit_names}
        cache.cur, cache.length = dst, total
        return outs

    def close(self) -> None:
        """Free the device memory this runner allocated (buffers, KV caches, scratch)."""
        self._closed = True
        self._bufs.free()
        for ptr in self._all_kv:
            self.device.free(ptr)
        self._all_kv.clear()
        self._pool.clear()
        for eng in self.engines.values():
            eng.free()
