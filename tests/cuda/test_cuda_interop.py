"""GPU arrays from other libraries, zero-copy, on a real GPU (the simulator has no device
memory to share): CuPy arrays, PyTorch CUDA tensors, and a minimal foreign object that
exposes nothing but ``__cuda_array_interface__``. Each runs a few Adam steps and must match
fastopt on NumPy arrays; the parameter objects are updated in place. The stream tests make
the gradients on a non-blocking stream and read the result on that stream without any
synchronization: only kernels enqueued on the exported stream make them pass reliably.
"""

from __future__ import annotations

import numpy as np
import pytest
from cuda_cases import random_arrays

import fastopt as fo

pytestmark = pytest.mark.gpu

SHAPES = [(37,), (20, 15)]
TOL = {"rtol": 2e-5, "atol": 1e-6}


class Foreign:
    """Only ``__cuda_array_interface__`` (a Numba device array's), and the owner of the memory."""

    def __init__(self, owner, stream=None):
        self._owner = owner
        cai = dict(owner.__cuda_array_interface__)
        if stream is not None:
            cai["stream"] = stream
        self.__cuda_array_interface__ = cai


def _host_reference(params, grads_per_step, **options):
    params = [p.copy() for p in params]
    opt = fo.Adam(params, **options)
    for grads in grads_per_step:
        opt.step(grads)
    return params, opt.state_dict()


def _steps(rng, n=3):
    return [random_arrays(rng, SHAPES, np.float32) for _ in range(n)]


def test_foreign_cuda_array_interface_object(cuda):
    rng = np.random.default_rng(0)
    start, steps = random_arrays(rng, SHAPES, np.float32), _steps(rng)
    owners = [cuda.to_device(p) for p in start]
    params = [Foreign(o) for o in owners]
    opt = fo.Adam(params, lr=0.01, amsgrad=True)
    for grads in steps:
        opt.step([Foreign(cuda.to_device(g)) for g in grads])
    expected, sd = _host_reference(start, steps, lr=0.01, amsgrad=True)
    for o, e in zip(owners, expected):
        np.testing.assert_allclose(o.copy_to_host(), e, **TOL)
    for i in (0, 1):
        for k, v in opt.state_dict()["state"][i].items():
            if k != "step":
                np.testing.assert_allclose(v, sd["state"][i][k], **TOL)


def test_foreign_object_on_a_stream(cuda):
    """The kernels run on the stream the gradients export."""
    stream = cuda.stream()
    p = cuda.device_array(1 << 16, np.float32, stream=stream)
    p.copy_to_device(np.ones(1 << 16, np.float32), stream=stream)
    g = cuda.to_device(np.ones(1 << 16, np.float32), stream=stream)
    opt = fo.SGD([Foreign(p)], lr=0.25)
    for _ in range(4):
        opt.step([Foreign(g, stream=int(stream))])
    out = p.copy_to_host(stream=stream)
    stream.synchronize()
    np.testing.assert_array_equal(out, np.zeros(1 << 16, np.float32))


def test_cupy_arrays():
    cp = pytest.importorskip("cupy")
    rng = np.random.default_rng(1)
    start, steps = random_arrays(rng, SHAPES, np.float32), _steps(rng)
    params = [cp.asarray(p) for p in start]
    before = [p.data.ptr for p in params]
    opt = fo.Adam(params, lr=0.01, weight_decay=0.01)
    for grads in steps:
        opt.step([cp.asarray(g) for g in grads])
    expected, _ = _host_reference(start, steps, lr=0.01, weight_decay=0.01)
    assert [p.data.ptr for p in params] == before  # in place
    for p, e in zip(params, expected):
        np.testing.assert_allclose(cp.asnumpy(p), e, **TOL)


def test_cupy_non_blocking_stream():
    cp = pytest.importorskip("cupy")
    n = 1 << 20
    w = cp.ones(n, cp.float32)
    opt = fo.SGD([w], lr=0.5)
    cp.cuda.Device().synchronize()  # w is ready before the side stream uses it
    with cp.cuda.Stream(non_blocking=True):
        g = cp.full(n, 2.0, cp.float32)
        if g.__cuda_array_interface__.get("stream") is None:
            pytest.skip("this CuPy does not export its stream in __cuda_array_interface__")
        for _ in range(3):
            g *= 1.0  # work on this stream right before each step
            opt.step([g])
        out = cp.asnumpy(w)  # on the same stream: ordered after the steps
    np.testing.assert_array_equal(out, np.full(n, -2.0, np.float32))


def test_torch_cuda_tensors_match_torch_optim():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA")
    rng = np.random.default_rng(2)
    start, steps = random_arrays(rng, SHAPES, np.float32), _steps(rng)
    ours = [torch.tensor(p, device="cuda") for p in start]
    theirs = [torch.tensor(p, device="cuda", requires_grad=True) for p in start]
    opt = fo.Adam(ours, lr=0.01, betas=(0.8, 0.99))
    ref = torch.optim.Adam(theirs, lr=0.01, betas=(0.8, 0.99), fused=True)
    for grads in steps:
        opt.step([torch.tensor(g, device="cuda") for g in grads])
        for t, g in zip(theirs, grads):
            t.grad = torch.tensor(g, device="cuda")
        ref.step()
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a.cpu().numpy(), b.detach().cpu().numpy(), **TOL)
    sd = opt.state_dict()
    for i, t in enumerate(theirs):
        np.testing.assert_allclose(sd["state"][i]["exp_avg_sq"], ref.state[t]["exp_avg_sq"].cpu().numpy(), **TOL)


def test_torch_side_stream():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA")
    n = 1 << 20
    w = torch.ones(n, device="cuda")
    opt = fo.SGD([w], lr=0.5)
    torch.cuda.synchronize()  # w is ready before the side stream uses it
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        g = torch.full((n,), 2.0, device="cuda")
        for _ in range(3):
            g.mul_(1.0)
            opt.step([g])
        out = w.cpu()  # on the side stream: ordered after the steps
    np.testing.assert_array_equal(out.numpy(), np.full(n, -2.0, np.float32))


def test_parameters_on_two_real_gpus(cuda):
    if len(cuda.gpus) < 2:
        pytest.skip("needs two GPUs")
    with cuda.gpus[0]:
        a = cuda.to_device(np.zeros(4, np.float32))
    with cuda.gpus[1]:
        b = cuda.to_device(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="parameter 1 is on GPU 1 but parameter 0 is on GPU 0"):
        fo.Adam([a, b])
