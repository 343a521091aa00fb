"""Bad input on the GPU path: clear errors, raised before any buffer changes."""

from __future__ import annotations

import numpy as np
import pytest

import fastopt as fo
from fastopt import _cuda_backend
from fastopt.kernels import cuda as kcuda


def _dev(cuda, *shape, dtype=np.float32, value=0.0):
    return cuda.to_device(np.full(shape, value, dtype))


def test_mixing_host_and_device_parameters(cuda):
    with pytest.raises(TypeError, match=r"mix NumPy arrays \(parameter 1\) and GPU arrays \(parameter 0"):
        fo.Adam([_dev(cuda, 4), np.zeros(4, np.float32)])
    with pytest.raises(TypeError, match="mix NumPy arrays"):
        fo.SGD([{"params": [np.zeros(3)]}, {"params": [_dev(cuda, 3, dtype=np.float64)]}])


def test_host_gradient_for_device_parameter(cuda):
    p = _dev(cuda, 4)
    opt = fo.Adam([p])
    with pytest.raises(TypeError, match="gradient 0 is a NumPy array but its parameter is on GPU 0"):
        opt.step([np.ones(4, np.float32)])


def test_device_gradient_for_host_parameter(cuda):
    opt = fo.Adam([np.zeros(4, np.float32)])
    with pytest.raises(TypeError, match="gradient 0 is a GPU array .* but the parameters are NumPy arrays"):
        opt.step([_dev(cuda, 4)])


@pytest.mark.parametrize(
    ("grad", "error", "match"),
    [
        (lambda cuda: _dev(cuda, 4, dtype=np.float64), TypeError,
         "has dtype float64 but its parameter has dtype float32"),
        (lambda cuda: _dev(cuda, 5), ValueError, r"has shape \(5,\) but its parameter has shape \(4,\)"),
        (lambda cuda: _dev(cuda, 4, 2)[:, 0], ValueError, "is not C-contiguous"),
        (lambda cuda: [1.0, 2.0, 3.0, 4.0], TypeError, r"must be a GPU array \(exposing .*got list"),
    ],
    ids=["dtype", "shape", "strided", "list"],
)
def test_bad_second_gradient_changes_nothing(cuda, grad, error, match):
    """The first parameter's good gradient is not applied when the second one is bad."""
    a, b = _dev(cuda, 3, value=1.0), _dev(cuda, 4, value=1.0)
    opt = fo.Adam([a, b], lr=0.1)
    with pytest.raises(error, match=f"gradient 1 {match}"):
        opt.step([_dev(cuda, 3, value=1.0), grad(cuda)])
    np.testing.assert_array_equal(a.copy_to_host(), np.ones(3, np.float32))
    np.testing.assert_array_equal(opt.state[0]["exp_avg"].copy_to_host(), np.zeros(3, np.float32))
    assert opt.state[0]["step"] == 0


def test_gradient_sharing_memory_with_its_parameter(cuda):
    p = _dev(cuda, 4)
    opt = fo.SGD([p], lr=0.1)
    with pytest.raises(ValueError, match="shares memory with its parameter"):
        opt.step([p])


@pytest.mark.parametrize(
    ("param", "error", "match"),
    [
        (lambda cuda: _dev(cuda, 4, dtype=np.int32), TypeError, "parameter 0 has dtype int32"),
        (lambda cuda: _dev(cuda, 4, 2)[:, 1], ValueError, "parameter 0 is not C-contiguous"),
    ],
    ids=["int", "strided"],
)
def test_bad_device_parameter(cuda, param, error, match):
    with pytest.raises(error, match=match):
        fo.Adam([param(cuda)])


def test_same_device_array_twice(cuda):
    p = _dev(cuda, 4)
    with pytest.raises(ValueError, match="parameter 0 and parameter 1 share memory"):
        fo.Adam([p, p])


@pytest.fixture
def two_gpus(monkeypatch):
    """Pretend there are two GPUs and that the arrays marked here live on the second."""
    on_second: set[int] = set()
    monkeypatch.setattr(_cuda_backend, "_gpu_count", lambda cuda: 2)
    monkeypatch.setattr(_cuda_backend, "_device_of", lambda ptr: 1 if ptr in on_second else 0)

    def mark(array):
        on_second.add(_cuda_backend._describe(array, "", kcuda.simulator()).ptr)
        return array

    return mark


def test_parameters_on_two_gpus(cuda, two_gpus):
    with pytest.raises(ValueError, match="parameter 1 is on GPU 1 but parameter 0 is on GPU 0"):
        fo.Adam([_dev(cuda, 4), two_gpus(_dev(cuda, 4))])


def test_gradient_on_another_gpu(cuda, two_gpus):
    p = _dev(cuda, 4, value=1.0)
    opt = fo.Adam([p])
    with pytest.raises(ValueError, match="gradient 0 is on GPU 1 but its parameter is on GPU 0"):
        opt.step([two_gpus(_dev(cuda, 4, value=1.0))])
    opt.step([_dev(cuda, 4, value=1.0)])  # a gradient on the parameter's GPU is fine
    assert opt.state[0]["step"] == 1


def test_cuda_unavailable_says_why(cuda, monkeypatch):
    monkeypatch.setattr(kcuda, "_load", lambda: (None, "no CUDA GPU was found"))
    with pytest.raises(kcuda.CudaUnavailableError, match="GPU arrays need CUDA, which is unavailable here: "
                                                         "no CUDA GPU was found"):
        fo.Adam([_dev(cuda, 4)])
