"""FlatParams on a GPU: the device side of :mod:`fastopt.flat` and :mod:`fastopt._flat_engine`.

A :class:`~fastopt.FlatParams` whose ``buffer`` is a GPU array (``flat.to_device()``, or
``FlatParams.from_layout(layout, gpu_array)`` over any object exposing
``__cuda_array_interface__``, zero-copy) hands out device views (Numba device arrays) instead
of NumPy views. An optimizer over it keeps its flat state buffers on the same GPU and runs the
*segmented* CUDA kernel (:mod:`kernels.cuda`): one launch per step for the whole buffer, with
the CPU kernel's ``(bounds, table)``, copied to the device at each launch (the table holds the
step's scalars; ``bounds`` and ``table`` together are a few hundred bytes for a model of tens
of tensors).

Padding: as on the host, a NaN or inf in the gradient's padding is an error (padding rows scale
the gradient by 0, and ``0 * inf`` is NaN). On the GPU that check is a small kernel over the
padding indices whose one-int verdict is copied back: **one 4-byte device-to-host copy per
step, which waits for the device**, whenever the layout has padding. A layout built with
``align`` equal to the item size (``FlatParams(shapes, align=4)`` for float32) has no padding,
and then no check and no copy. ``clip_grad_norm`` / ``skip_nonfinite`` add the reduction's own
copy (:meth:`fastopt._cuda_backend.CudaBackend.sumsq`).

Streams: the update and norm kernels go to the stream of the gradient buffer (the default
stream for fastopt's own buffers, ``zeros_like()``); a gradient given as a foreign GPU array is
wrapped by ``numba.cuda.as_cuda_array``, which first synchronizes on the stream its interface
names. The padding check and state allocation use the default stream.
"""

from __future__ import annotations

import functools

import numpy as np

from ._backend import is_device_array
from .kernels import _build
from .kernels import cuda as kcuda


def is_device_buffer(buffer) -> bool:
    """Whether a FlatParams buffer lives on a GPU."""
    return not isinstance(buffer, np.ndarray) and is_device_array(buffer)


def _cuda():
    return kcuda.require()


def as_device_buffer(obj, size: int, dtype: np.dtype):
    """``obj`` (a GPU array) as a flat Numba device array over the same memory, after checking
    it can be a buffer of ``size`` elements of ``dtype``."""
    cuda = _cuda()
    arr = obj if getattr(obj, "__cuda_ndarray__", False) is True else cuda.as_cuda_array(obj)
    if arr.shape != (size,) or np.dtype(arr.dtype) != dtype:
        raise ValueError(f"buffer has shape {arr.shape} and dtype {arr.dtype}; "
                         f"the layout needs shape ({size},) and dtype {dtype}")
    if not arr.is_c_contiguous():
        raise ValueError("buffer must be C-contiguous")
    return arr


def zeros(size: int, dtype: np.dtype):
    """A zero-filled flat device array."""
    cuda = _cuda()
    buf = cuda.device_array(size, dtype)
    kcuda.fill(buf, 0.0)
    cuda.synchronize()
    return buf


def fill(buf, value: float) -> None:
    """Set every element of the device array (or slice) ``buf`` to ``value``."""
    kcuda.fill(buf, value)
    _cuda().synchronize()


def to_host(buf) -> np.ndarray:
    _cuda().synchronize()
    return buf.copy_to_host()


def copy_in(view, value: np.ndarray) -> None:
    """Copy host ``value`` into the device view ``view`` (same shape and dtype)."""
    cuda = _cuda()
    cuda.synchronize()
    view.copy_to_device(np.ascontiguousarray(value))
    cuda.synchronize()


def copy_buffer(buf):
    """A new device array holding a copy of the device array ``buf``."""
    new = _cuda().device_array(buf.shape, buf.dtype)
    new.copy_to_device(buf)
    return new


def extent(buf) -> tuple[int, int]:
    """``(pointer, nbytes)`` of a device array (for overlap checks)."""
    from ._cuda_backend import _describe

    desc = _describe(buf, "buffer", kcuda.simulator())
    return desc.ptr, desc.nbytes


def overlaps(a, b) -> bool:
    (pa, na), (pb, nb) = extent(a), extent(b)
    return bool(na and nb and pa < pb + nb and pb < pa + na)


_PADDING = '''
def padding_kind(g, index, out):
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < index.size:
        x = g[index[i]]
        d = x - x
        if d != d:
            cuda.atomic.max(out, 0, 2)
        elif x != d:
            cuda.atomic.max(out, 0, 1)
        i += stride
'''


@functools.cache
def _padding_kernel():
    cuda = _cuda()
    return cuda.jit(_build.compile_source(_PADDING, "padding_kind", {"cuda": cuda}))


class DevicePadding:
    """The padding check of one layout on the device (see the module docstring)."""

    def __init__(self, pad_index: np.ndarray):
        cuda = _cuda()
        self.index = cuda.to_device(pad_index)
        self.out = cuda.device_array(1, np.int32)

    def kind(self, g) -> int:
        """0 if ``g``'s padding is all zero, 2 if it holds NaN or inf, else 1."""
        kcuda.fill(self.out, 0)
        blocks, threads = kcuda.launch_shape(self.index.size)
        _padding_kernel()[blocks, threads](g, self.index, self.out)
        return int(self.out.copy_to_host()[0])
