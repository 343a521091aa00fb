"""Where an optimizer's arrays live, chosen once from its parameters: the host or a GPU.

NumPy arrays run on the CPU kernels (:class:`HostBackend`). Objects exposing
``__cuda_array_interface__`` (Numba device arrays, CuPy arrays, PyTorch CUDA tensors) and
Numba's device arrays run on the CUDA kernels (:class:`fastopt._cuda_backend.CudaBackend`,
imported only then, so ``import fastopt`` never imports ``numba.cuda``). One optimizer holds
arrays of one kind on one device; anything else is a clear error.

A backend gives the optimizer everything that depends on where the arrays are: checks,
flat views, state allocation, the kernel launch, and copies to and from the host for
``state_dict``/``load_state_dict``.
"""

from __future__ import annotations

import numpy as np

from . import _validation
from .kernels import _build, reduce


def is_device_array(obj) -> bool:
    """Whether ``obj`` is a GPU array fastopt can update (without importing ``numba.cuda``)."""
    if isinstance(obj, np.ndarray):
        return False
    # Numba's device arrays (and the CUDA simulator's) say so; anything else exports the
    # CUDA Array Interface (a CPU torch tensor raises AttributeError, so hasattr is False).
    return getattr(obj, "__cuda_ndarray__", False) is True or hasattr(obj, "__cuda_array_interface__")


def is_array(obj) -> bool:
    """A NumPy array or a GPU array (as opposed to a sequence of them)."""
    return isinstance(obj, np.ndarray) or is_device_array(obj)


def select(arrays: list):
    """The backend for an optimizer over ``arrays``: the host unless they are GPU arrays."""
    on_device = [i for i, a in enumerate(arrays) if is_device_array(a)]
    if not on_device:
        return HOST
    on_host = [i for i, a in enumerate(arrays) if isinstance(a, np.ndarray)]
    if on_host:
        raise TypeError(f"parameters mix NumPy arrays (parameter {on_host[0]}) and GPU arrays "
                        f"(parameter {on_device[0]}, {type(arrays[on_device[0]]).__name__}); "
                        "one optimizer updates arrays on one device")
    from ._cuda_backend import CudaBackend

    return CudaBackend()


class HostBackend:
    """NumPy arrays, updated in place by the CPU kernels (:func:`kernels._build.run_cpu`)."""

    name = "cpu"
    check_param = staticmethod(_validation.check_param)
    check_no_overlap = staticmethod(_validation.check_no_overlap)
    run = staticmethod(_build.run_cpu)

    @staticmethod
    def shape_dtype(a: np.ndarray) -> tuple[tuple, np.dtype]:
        return a.shape, a.dtype

    @staticmethod
    def flat(a: np.ndarray) -> np.ndarray:
        """The kernel's view of a checked parameter or a state buffer (base class, 1-D)."""
        return _validation.flat_view(a, a.size)

    @staticmethod
    def full_like(a: np.ndarray, value: float) -> np.ndarray:
        """A state buffer for parameter ``a``: always a base-class ``np.ndarray``."""
        return np.full_like(a, value, subok=False)

    @staticmethod
    def launcher(rule: _build.Rule, n: int):
        """``launch(param, grad, states, bounds, table)`` for ``n`` elements of ``rule``."""
        kernel = _build.cpu_kernel(rule, _build.use_parallel(rule, n))

        def launch(param, grad, states, bounds, table):
            kernel(param, grad, *states, bounds, table)

        return launch

    @staticmethod
    def grad(g, param: np.ndarray, where) -> np.ndarray:
        """Check gradient ``g`` of ``param``; its flat view. ``where`` as in ``check_grad``."""
        if type(g) is not np.ndarray and is_device_array(g):
            raise TypeError(f"{_validation._name(where)} is a GPU array ({type(g).__name__}) but the parameters "
                            "are NumPy arrays on the host; pass the gradient as a NumPy array")
        _validation.check_grad(g, param, where)
        return _validation.flat_view(g, param.size)

    @staticmethod
    def run_noise(rule: _build.Rule, param, grad, states, bounds, table, key, offset) -> None:
        """:meth:`run` with gradient noise: the CPU noise kernel (``kernels._build``)."""
        kernel = _build.cpu_noise_kernel(rule, _build.use_parallel(rule, param.size), param.dtype)
        kernel(param, grad, *states, bounds, table, key, offset)

    sumsq = staticmethod(reduce.sumsq_all)  # (sum of squares, finite) over flat gradients

    @staticmethod
    def to_host(buf: np.ndarray) -> np.ndarray:
        return buf.copy()

    @staticmethod
    def copy_in(dst: np.ndarray, value: np.ndarray) -> None:
        np.copyto(dst, value)


HOST = HostBackend()
