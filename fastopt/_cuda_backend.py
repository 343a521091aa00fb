"""The GPU backend: an optimizer over CuPy arrays, PyTorch CUDA tensors, Numba device arrays or
any object exposing ``__cuda_array_interface__``, updated in place by the CUDA kernels.

Zero-copy: each array is wrapped once in a Numba device-array view of its memory
(``numba.cuda.from_cuda_array_interface``, the machinery of ``numba.cuda.as_cuda_array``);
gradients are wrapped at every step. State buffers are Numba device arrays on the
parameters' device, filled by a small kernel at construction.

A step copies nothing between host and device and never synchronizes:

- the per-step scalars (learning rate, bias corrections, ...) are kernel arguments
  (:mod:`kernels.cuda` explains why they are not a device table);
- the gradients' ``__cuda_array_interface__`` names the stream of the framework that produced
  them (CuPy's or PyTorch's current stream). The CUDA Array Interface asks a consumer either
  to synchronize on that stream or to enqueue its work on it; fastopt enqueues its kernels on
  it, so a step is ordered after the work that made the gradients and before later work on
  that stream, and ``sync=False`` keeps Numba from synchronizing on import. An interface
  without a stream (a Numba array on the default stream) runs on the default stream.

``state_dict()`` waits for the device and copies each buffer to a host NumPy array;
``load_state_dict()`` copies host arrays into the device buffers and waits, so that steps on
any stream see the loaded values. Allocating a state buffer also waits for its fill.

Parameters are bound when the optimizer is built: replacing a tensor's storage afterwards
(``p.data = ...`` in PyTorch) is not seen, as with any view.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import numpy as np

from . import _validation
from .kernels import cuda as kcuda


class _Desc(NamedTuple):
    """What fastopt needs to know about one device array."""

    shape: tuple
    dtype: np.dtype
    ptr: int
    nbytes: int
    contiguous: bool
    readonly: bool
    stream: int | None  # the interface's stream: None, 1 (legacy default), 2 (per-thread) or a handle


def _c_contiguous(shape: tuple, strides, itemsize: int) -> bool:
    if strides is None:
        return True
    expected = itemsize
    for n, s in zip(reversed(shape), reversed(strides)):
        if n > 1 and s != expected:
            return False
        expected *= n
    return True


def _describe(obj, where: str, simulator: bool) -> _Desc:
    """Read ``obj``'s layout from its CUDA Array Interface (or, in the simulator, from the
    simulated device array), raising TypeError for what fastopt cannot update."""
    if simulator and getattr(obj, "__cuda_ndarray__", False) is True:
        data = obj.__array_interface__["data"]
        return _Desc(tuple(obj.shape), np.dtype(obj.dtype), data[0], obj.nbytes, obj.is_c_contiguous(),
                     False, None)
    cai = None if isinstance(obj, np.ndarray) else getattr(obj, "__cuda_array_interface__", None)
    if cai is None:
        raise TypeError(f"{where} must be a GPU array (exposing __cuda_array_interface__) like the "
                        f"other arrays of this optimizer, got {type(obj).__name__}")
    try:
        shape = tuple(int(n) for n in cai["shape"])
        dtype = np.dtype(cai["typestr"])
        ptr, readonly = cai["data"]
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise TypeError(f"{where} ({type(obj).__name__}) has a malformed __cuda_array_interface__ ({exc})") from None
    if cai.get("mask") is not None:
        raise TypeError(f"{where} is a masked GPU array; fastopt updates plain arrays")
    nbytes = math.prod(shape) * dtype.itemsize
    return _Desc(shape, dtype, int(ptr or 0), nbytes, _c_contiguous(shape, cai.get("strides"), dtype.itemsize),
                 bool(readonly), cai.get("stream"))


def _device_of(ptr: int) -> int:
    """The ordinal of the GPU that holds device pointer ``ptr`` (unified addressing)."""
    from numba.cuda.cudadrv import driver

    attr = driver.binding.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL
    return int(driver.driver.cuPointerGetAttribute(attr, driver.binding.CUdeviceptr(ptr)))


def _gpu_count(cuda) -> int:
    return len(cuda.gpus)


class CudaBackend:
    """Device arrays on one GPU, updated in place by :func:`kernels.cuda.run_cuda`.

    Raises :class:`kernels.cuda.CudaUnavailableError` (saying why) where CUDA cannot run.
    """

    name = "cuda"

    def __init__(self):
        self._cuda = kcuda.require()
        self._sim = kcuda.simulator()
        self._multi = _gpu_count(self._cuda) > 1  # device checks and switches only then
        self.device: int | None = None  # set by the first parameter
        self._first = ""
        self._info: dict[int, _Desc] = {}  # id(param) -> layout; the optimizer keeps params alive
        self._streams: dict = {}
        self._partials = None  # (device, host) float64 (2, nchunks) buffers of the norm reduction

    # -- where the work runs ------------------------------------------------------------
    def _context(self):
        """The parameters' GPU as Numba's current device (only needed with several GPUs)."""
        if self._multi and self.device is not None:
            return self._cuda.gpus[self.device]
        return contextlib.nullcontext()

    def _device(self, desc: _Desc) -> int:
        if not self._multi or not desc.ptr:
            return 0 if self.device is None else self.device
        return _device_of(desc.ptr)

    def _stream(self, handle):
        """A Numba stream for the interface's ``stream`` entry (0: the default stream)."""
        if handle is None or self._sim:
            return 0
        stream = self._streams.get(handle)
        if stream is None:
            cuda = self._cuda
            if handle == 1:
                stream = cuda.legacy_default_stream()
            elif handle == 2:
                stream = cuda.per_thread_default_stream()
            else:
                stream = cuda.external_stream(handle)
            self._streams[handle] = stream
        return stream

    def _view(self, obj, desc: _Desc):
        """A flat Numba device array over ``obj``'s memory (no copy), bound to its stream."""
        if self._sim:
            return obj.reshape(-1)
        n = math.prod(desc.shape)
        with self._context():
            view = self._cuda.from_cuda_array_interface(
                {"shape": (n,), "strides": None, "typestr": desc.dtype.str, "data": (desc.ptr, False),
                 "version": 3, "stream": None},
                owner=obj, sync=False)
        view.stream = self._stream(desc.stream)
        return view

    # -- the backend interface (see fastopt._backend.HostBackend) -------------------------
    def check_param(self, p, where: str) -> None:
        desc = _describe(p, where, self._sim)
        if desc.dtype not in _validation.FLOAT_DTYPES:
            raise TypeError(f"{where} has dtype {desc.dtype}; fastopt updates float32 and float64 arrays")
        if not desc.contiguous:
            raise ValueError(f"{where} is not C-contiguous; pass a contiguous copy and keep that array")
        if desc.readonly:
            raise ValueError(f"{where} is read-only; fastopt updates parameters in place")
        device = self._device(desc)
        if self.device is None:
            self.device, self._first = device, where
        elif device != self.device:
            raise ValueError(f"{where} is on GPU {device} but {self._first} is on GPU {self.device}; "
                             "one optimizer updates arrays on one device")
        self._info[id(p)] = desc

    def check_no_overlap(self, arrays, names) -> None:
        def extent(a):
            desc = self._info[id(a)]
            return desc.ptr, desc.nbytes

        _validation.check_no_overlap(arrays, names, extent)

    def shape_dtype(self, p) -> tuple[tuple, np.dtype]:
        desc = self._info[id(p)]
        return desc.shape, desc.dtype

    def flat(self, a):
        if id(a) in self._info:
            return self._view(a, self._info[id(a)])
        return a.reshape(-1)  # a state buffer: a Numba device array of our own

    def full_like(self, p, value: float):
        shape, dtype = self.shape_dtype(p)
        with self._context():
            buf = self._cuda.device_array(shape, dtype)
            kcuda.fill(buf.reshape(-1), value, device_id=self.device or 0)
            self._cuda.synchronize()  # steps may run on another stream than this fill
        return buf

    def grad(self, g, param, where):
        """Check gradient ``g`` of ``param``; a flat view of it bound to its stream."""
        where = _validation._name(where)
        if isinstance(g, np.ndarray):
            raise TypeError(f"{where} is a NumPy array but its parameter is on GPU {self.device}; "
                            "pass the gradient as a GPU array on the same device")
        desc = _describe(g, where, self._sim)
        p = self._info[id(param)]
        if desc.dtype != p.dtype:
            raise TypeError(f"{where} has dtype {desc.dtype} but its parameter has dtype {p.dtype}")
        if desc.shape != p.shape:
            raise ValueError(f"{where} has shape {desc.shape} but its parameter has shape {p.shape}")
        if not desc.contiguous:
            raise ValueError(f"{where} is not C-contiguous")
        if self._multi and desc.ptr and _device_of(desc.ptr) != self.device:
            raise ValueError(f"{where} is on GPU {_device_of(desc.ptr)} but its parameter is on GPU "
                             f"{self.device}; pass the gradient on the parameter's device")
        if desc.nbytes and desc.ptr < p.ptr + p.nbytes and p.ptr < desc.ptr + desc.nbytes:
            raise ValueError(f"{where} shares memory with its parameter; pass a separate gradient buffer")
        return self._view(g, desc)

    def run(self, rule, param, grad, states, bounds, table) -> None:
        with self._context():
            kcuda.run_cuda(rule, param, grad, states, bounds, table, grad.stream, self.device or 0)

    def launcher(self, rule, n: int):
        """``launch(param, grad, states, bounds, table)``: :meth:`run` for ``rule``."""

        def launch(param, grad, states, bounds, table):
            self.run(rule, param, grad, states, bounds, table)

        return launch

    def run_noise(self, rule, param, grad, states, bounds, table, key, offset) -> None:
        """:meth:`run` with gradient noise (:func:`kernels.cuda.run_cuda_noise`)."""
        with self._context():
            kcuda.run_cuda_noise(rule, param, grad, states, bounds, table, key, offset, grad.stream,
                                 self.device or 0)

    def sumsq(self, grads) -> tuple[float, bool]:
        r"""``(sum of squares, finite)`` over the flat device gradients ``grads`` (``None`` skipped).

        Each gradient is reduced on its stream by :func:`kernels.cuda.sumsq_partials` into
        its own range of one float64 ``(2, nchunks)`` device buffer (row 0 the chunk sums of
        squares, row 1 the non-finite flags); then that buffer is copied to the host, **one
        small device-to-host copy per step that waits for the reduction** (16 bytes per
        ``CUDA_BLOCK * CUDA_REDUCE_ITEMS`` gradient elements: 8 KiB per 2^20 elements by
        default), and the host adds the chunk sums with ``math.fsum`` (exactly rounded, so in
        no particular order). The result depends on the chunking only, never on the number of
        blocks; it equals the CPU's :func:`kernels.reduce.sumsq` up to float64 rounding (the
        two add in different orders). Only ``clip_grad_norm`` and ``skip_nonfinite`` call this.
        """
        cuda = self._cuda
        live = [g for g in grads if g is not None and g.size]
        if not live:
            return 0.0, True
        counts = [kcuda.reduce_chunks(g.size) for g in live]
        total = sum(counts)
        with self._context():
            if self._partials is None or self._partials[0].shape[1] != total:
                dev = cuda.device_array((2, total), np.float64)
                host = cuda.pinned_array((2, total), np.float64) if not self._sim else np.empty((2, total))
                self._partials = (dev, host)
            dev, host = self._partials
            streams = {id(g.stream): g.stream for g in live}
            offset = 0
            for g, k in zip(live, counts):
                kcuda.sumsq_partials(g, dev[0, offset:offset + k], dev[1, offset:offset + k], g.stream,
                                     self.device or 0)
                offset += k
            if len(streams) == 1:
                stream = live[0].stream
            else:  # gradients on several streams: wait for all of them
                cuda.synchronize()
                stream = 0
            dev.copy_to_host(host, stream=stream)
            if not isinstance(stream, int):  # an asynchronous copy into pinned memory: wait for it
                stream.synchronize()
        return math.fsum(host[0].tolist()), not bool(np.any(host[1] != 0.0))

    def to_host(self, buf) -> np.ndarray:
        with self._context():
            self._cuda.synchronize()
            return buf.copy_to_host()

    def copy_in(self, dst, value: np.ndarray) -> None:
        with self._context():
            self._cuda.synchronize()
            dst.copy_to_device(np.ascontiguousarray(value))
            self._cuda.synchronize()
