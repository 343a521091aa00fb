"""CUDA is optional: ``import fastopt`` never imports ``numba.cuda``, and a GPU array where
CUDA cannot run raises an error that says why (the CUDA tests proper are in ``tests/cuda``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import fastopt as fo
from fastopt.kernels import cuda as kcuda


class ForeignArray:
    """Something exposing ``__cuda_array_interface__`` (its pointer is never used here)."""

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"shape": (4,), "typestr": "<f4", "data": (0x7F0000000000, False), "strides": None,
                "version": 3}


def test_import_does_not_import_numba_cuda(tmp_path):
    code = "import sys, fastopt, fastopt.kernels; print('numba.cuda' in sys.modules)"
    # from elsewhere than the checkout, whose fastopt/ lacks the installed fastopt.kernels
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "False"


@pytest.fixture
def fresh_load():
    kcuda._load.cache_clear()
    yield
    kcuda._load.cache_clear()


def test_without_numba_cuda_the_error_says_to_install_it(monkeypatch, fresh_load):
    monkeypatch.setitem(sys.modules, "numba_cuda", None)  # makes `import numba_cuda` fail
    with pytest.raises(kcuda.CudaUnavailableError, match=r"needs the numba-cuda package.*fastopt\[cuda12\]"):
        fo.Adam([ForeignArray()])
    assert not kcuda.available()


def test_without_a_gpu_the_error_says_why():
    if kcuda.available():
        pytest.skip("CUDA can run here (a GPU or the simulator)")
    with pytest.raises(kcuda.CudaUnavailableError, match="GPU arrays need CUDA, which is unavailable here: "):
        fo.SGD([ForeignArray()])


def test_a_cpu_torch_tensor_is_not_a_gpu_array():
    torch = pytest.importorskip("torch")
    from fastopt._backend import is_device_array

    assert not is_device_array(torch.zeros(3))
    with pytest.raises(TypeError, match="must be a NumPy array"):
        fo.SGD([torch.zeros(3)])
