"""FlatParams on the GPU: an optimizer over a device FlatParams against the same optimizer over
the host FlatParams (the CPU flat engine, checked against the per-array path in the main
suite). Parameters, every state buffer and the state dict after each step; one segmented CUDA
launch per step when the groups share a rule variant; the transforms; padding checks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import fastopt as fo
from fastopt.kernels import _config
from fastopt.kernels import cuda as kcuda

SHAPES = {"w1": (5, 7), "b1": 7, "w2": (7, 3), "b2": 3}  # 66 parameters in 112 (f32) / 96 (f64) elements
TOL = {np.float32: {"rtol": 2e-5, "atol": 1e-6}, np.float64: {"rtol": 1e-12, "atol": 1e-14}}
DTYPES = pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])


@pytest.fixture(autouse=True)
def _fine_chunks_and_quiet(monkeypatch):
    monkeypatch.setattr(_config, "CUDA_REDUCE_ITEMS", 4)
    with warnings.catch_warnings():  # the simulator runs the noise hash's uint64 math in NumPy
        warnings.filterwarnings("ignore", "overflow encountered", RuntimeWarning)
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
        yield


def _flat(dtype, rng, align=64):
    flat = fo.FlatParams(SHAPES, dtype, align=align)
    for name in flat:
        flat[name][...] = rng.standard_normal(flat[name].shape)
    return flat


def _grads(flat, rng):
    g = flat.zeros_like()
    for name in g:
        g[name][...] = 3 * rng.standard_normal(g[name].shape)
    return g


def _groups(flat, weights: dict, biases: dict):
    return [{"params": flat.select("w*"), **weights}, {"params": flat.select("b*"), **biases}]


def _compare(host_opt, dev_opt, flat, dflat, dtype, when):
    np.testing.assert_allclose(dflat.to_host().buffer, flat.buffer, **TOL[dtype], err_msg=f"params {when}")
    hs, ds = host_opt.state_dict(), dev_opt.state_dict()
    assert hs["step_count"] == ds["step_count"]
    for name in flat:
        assert set(hs["state"][name]) == set(ds["state"][name])
        for k, v in hs["state"][name].items():
            if isinstance(v, np.ndarray):
                assert type(ds["state"][name][k]) is np.ndarray
                np.testing.assert_allclose(ds["state"][name][k], v, **TOL[dtype], err_msg=f"{name} {k} {when}")
            else:
                assert ds["state"][name][k] == v
    assert dev_opt.skipped_steps == host_opt.skipped_steps
    if host_opt.last_grad_norm is not None:
        assert dev_opt.last_grad_norm == pytest.approx(host_opt.last_grad_norm, rel=1e-14, nan_ok=True)


CASES = [
    (fo.AdamW, {"lr": 0.01}, {"weight_decay": 0.1}, {"lr": 0.05, "weight_decay": 0.0}),
    (fo.RMSprop, {"lr": 0.01, "centered": True}, {}, {"lr": 0.02}),
    # momentum in one group only: two rule variants, one launch per run of rows
    (fo.SGD, {"lr": 0.1}, {"momentum": 0.9}, {"maximize": True}),
]


@DTYPES
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0].__name__)
def test_flat_gpu_matches_flat_cpu(cuda, monkeypatch, case, dtype):
    cls, options, weights, biases = case
    rng = np.random.default_rng(1)
    flat = _flat(dtype, rng)
    dflat = flat.to_device()
    assert dflat.on_device and not flat.on_device and not isinstance(dflat["w1"], np.ndarray)
    host_opt = cls(_groups(flat, weights, biases), **options)
    dev_opt = cls(_groups(dflat, weights, biases), **options)
    launches = []
    real = kcuda.run_segmented

    def counting(rule, param, *args, **kwargs):
        launches.append((rule.name, param.size))
        real(rule, param, *args, **kwargs)

    monkeypatch.setattr(kcuda, "run_segmented", counting)
    for t in range(3):
        g = _grads(flat, rng)
        host_opt.step(g)
        dev_opt.step(g.to_device())
        _compare(host_opt, dev_opt, flat, dflat, dtype, f"after step {t + 1}")
    if cls is fo.SGD:
        # w1, b1, w2, b2 alternate between momentum and plain SGD: four runs of rows per step
        assert [r for r, _ in launches] == ["sgd_momentum", "sgd", "sgd_momentum", "sgd"] * 3
    else:
        assert launches == [(launches[0][0], flat.buffer.size)] * 3  # one launch per step, whole buffer


@DTYPES
def test_flat_gpu_transforms_match_cpu(cuda, dtype):
    rng = np.random.default_rng(2)
    flat = _flat(dtype, rng)
    dflat = flat.to_device()
    kw = {"lr": 0.01, "clip_grad_norm": 1.0, "skip_nonfinite": True, "grad_noise": (0.3, 0.55), "seed": 5}
    host_opt = fo.Adam(_groups(flat, {"weight_decay": 0.1}, {}), **kw)
    dev_opt = fo.Adam(_groups(dflat, {"weight_decay": 0.1}, {}), **kw)
    for t in range(3):
        g = _grads(flat, rng)
        if t == 1:
            g["w2"][2, 1] = np.nan
        host_opt.step(g)
        before = dflat.to_host().buffer
        dev_opt.step(g.to_device())
        if t == 1:
            assert dev_opt.last_step_skipped
            np.testing.assert_array_equal(dflat.to_host().buffer, before)
        _compare(host_opt, dev_opt, flat, dflat, dtype, f"after step {t + 1}")
    assert dev_opt.skipped_steps == 1 and dev_opt.step_count == 2


def test_padding_nan_is_an_error_and_nonzero_padding_is_left_out_of_the_norm(cuda):
    rng = np.random.default_rng(3)
    flat = _flat(np.float32, rng)
    dflat = flat.to_device()
    host_opt = fo.SGD(flat, lr=0.1, clip_grad_norm=1.0)
    dev_opt = fo.SGD(dflat, lr=0.1, clip_grad_norm=1.0)
    pad = int(np.flatnonzero(flat.layout.padding_mask())[0])
    g = _grads(flat, rng)
    g.buffer[pad] = 5.0  # finite padding: ignored, as on the host
    host_opt.step(g)
    dev_opt.step(g.to_device())
    _compare(host_opt, dev_opt, flat, dflat, np.float32, "with padding 5")
    g.buffer[pad] = np.inf
    before = dflat.to_host().buffer
    with pytest.raises(ValueError, match="padding"):
        dev_opt.step(g.to_device())
    np.testing.assert_array_equal(dflat.to_host().buffer, before)
    assert dev_opt.step_count == 1


def test_a_layout_without_padding(cuda):
    rng = np.random.default_rng(4)
    flat = _flat(np.float32, rng, align=4)
    assert not flat.layout.padding_mask().any()
    dflat = flat.to_device()
    host_opt, dev_opt = fo.Adagrad(flat, lr=0.1, initial_accumulator_value=0.5), fo.Adagrad(
        dflat, lr=0.1, initial_accumulator_value=0.5)
    for t in range(2):
        g = _grads(flat, rng)
        host_opt.step(g)
        dev_opt.step(g.to_device().buffer)  # a raw 1-D device buffer works too
        _compare(host_opt, dev_opt, flat, dflat, np.float32, f"after step {t + 1}")


def test_bad_gradients_are_refused(cuda):
    rng = np.random.default_rng(5)
    dflat = _flat(np.float32, rng).to_device()
    opt = fo.Adam(dflat, lr=0.01)
    host_grad = dflat.to_host()
    with pytest.raises(TypeError, match="on the host"):
        opt.step(host_grad)
    with pytest.raises(TypeError, match="GPU"):
        opt.step(host_grad.buffer)
    with pytest.raises(ValueError, match="shares memory with the parameters"):
        opt.step(dflat)
    with pytest.raises(ValueError, match="shares memory with the optimizer's exp_avg"):
        opt.step(opt._flat.buffers["exp_avg"])
    with pytest.raises(ValueError, match="shape"):
        opt.step(cuda.to_device(np.zeros(5, np.float32)))
    assert opt.step_count == 0


def test_state_dict_moves_between_host_and_gpu(cuda):
    """A GPU optimizer resumed from a CPU one's state dict continues exactly like it."""
    rng = np.random.default_rng(6)
    flat = _flat(np.float64, rng)
    host_opt = fo.NAdam(flat, lr=0.01)
    for _ in range(2):
        host_opt.step(_grads(flat, rng))
    dflat = flat.to_device()
    dev_opt = fo.NAdam(dflat, lr=0.01)
    dev_opt.load_state_dict(host_opt.state_dict())
    _compare(host_opt, dev_opt, flat, dflat, np.float64, "after loading")
    g = _grads(flat, rng)
    host_opt.step(g)
    dev_opt.step(g.to_device())
    _compare(host_opt, dev_opt, flat, dflat, np.float64, "a step after loading")
    states = dev_opt._flat.flat_state()  # the flat state buffers stay on the GPU
    assert all(s.on_device for s in states.values())


def test_device_flatparams_copies(cuda):
    rng = np.random.default_rng(7)
    flat = _flat(np.float32, rng)
    dflat = flat.to_device()
    copy = dflat.copy()
    copy["b1"].copy_to_device(np.zeros(7, np.float32))
    np.testing.assert_array_equal(dflat.to_host().buffer, flat.buffer)  # the copy is separate
    assert not copy.to_host()["b1"].any()
    zeros = dflat.zeros_like()
    assert zeros.on_device and zeros.layout == flat.layout and not zeros.to_host().buffer.any()
    again = fo.FlatParams.from_layout(flat.layout, dflat.buffer)  # zero-copy over a device buffer
    assert again.on_device
    np.testing.assert_array_equal(again.to_host().buffer, flat.buffer)
    with pytest.raises(ValueError, match="shape"):
        fo.FlatParams.from_layout(flat.layout, cuda.to_device(np.zeros(3, np.float32)))
