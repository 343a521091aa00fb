"""The CUDA tests: they run in Numba's CUDA simulator or on a real GPU, and skip otherwise.

The simulator must be switched on before Numba is imported, so these tests run in their own
pytest process (as ``.ci/run`` does)::

    NUMBA_ENABLE_CUDASIM=1 python -m pytest -q tests/cuda

In the main ``pytest`` run (Numba imported without the simulator, usually no GPU) every test
here skips, saying why. Two markers narrow a test further:

- ``gpu``: needs a real GPU (CuPy, PyTorch and foreign ``__cuda_array_interface__`` objects;
  the simulator has no device memory to share);
- ``ptx``: compiles PTX, which needs NVVM (a CUDA toolkit) but no GPU, and not the simulator.

Every other test shrinks the block size (``CUDA_BLOCK = 8``, at most 3 blocks) so that the
small inputs span several blocks and the grid-stride loop wraps.
"""

from __future__ import annotations

import pytest

RUN_SIM = "NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda"


def _target() -> tuple[str, str]:
    """``(mode, reason)``: mode is "sim", "gpu", or "" with the reason nothing can run."""
    try:
        import numba_cuda  # noqa: F401
    except ImportError:
        return "", "numba-cuda is not installed (pip install numba-cuda; the simulator needs nothing else)"
    from fastopt.kernels import cuda as kcuda

    if kcuda.simulator():
        return "sim", ""
    if kcuda.available():
        return "gpu", ""
    return "", f"no usable GPU ({kcuda._load()[1]}) and the CUDA simulator is off: run {RUN_SIM}"


MODE, REASON = _target()


def _nvvm() -> str:
    """Why PTX cannot be compiled here, or ""."""
    if MODE == "sim":
        return "the CUDA simulator compiles no PTX: run tests/cuda without NUMBA_ENABLE_CUDASIM"
    try:
        import numba_cuda  # noqa: F401
    except ImportError:
        return "numba-cuda is not installed"
    from numba.cuda.cudadrv import nvvm

    if not nvvm.is_available():
        return "NVVM (a CUDA toolkit) is not available: pip install 'fastopt[cuda12]'"
    try:  # NVVM alone is not enough when numba-cuda also needs NVRTC: try a real compile
        from numba import cuda

        cuda.compile_ptx(lambda x: None, "void(float32)", cc=(8, 0))
    except Exception as exc:  # the toolkit is incomplete; say what is missing
        return f"cannot compile PTX here ({type(exc).__name__}: {exc})"
    return ""


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a real CUDA GPU (not the simulator)")
    config.addinivalue_line("markers", "ptx: compiles PTX; needs NVVM and the simulator off")


@pytest.fixture(autouse=True)
def _cuda_target(request):
    if request.node.get_closest_marker("ptx"):
        reason = _nvvm()
        if reason:
            pytest.skip(reason)
        return
    if not MODE:
        pytest.skip(REASON)
    if request.node.get_closest_marker("gpu") and MODE != "gpu":
        pytest.skip("needs a real CUDA GPU; the simulator shares no device memory with CuPy or PyTorch")


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 8 threads, at most 3 of them: 37 elements span 3 blocks, 300 wrap the grid."""
    from fastopt.kernels import _config

    monkeypatch.setattr(_config, "CUDA_BLOCK", 8)
    monkeypatch.setattr(_config, "CUDA_MAX_BLOCKS", 3)


@pytest.fixture
def cuda():
    """``numba.cuda`` (the simulator's under NUMBA_ENABLE_CUDASIM=1)."""
    from numba import cuda

    return cuda
