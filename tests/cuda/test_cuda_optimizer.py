"""Every optimizer and option set on GPU arrays against the same optimizer on NumPy arrays.

The NumPy path runs the CPU kernels (checked against NumPy references and torch.optim in the
main suite); the GPU path runs the CUDA kernels through the backend. Parameters of 37 and 300
elements span several blocks of the shrunk block size; after every step the parameters and
every state buffer must agree.
"""

from __future__ import annotations

import numpy as np
import pytest
from cuda_cases import CASES, case_id, compare_params_and_state, random_arrays

import fastopt as fo

SHAPES = [(37,), (20, 15)]  # 37 and 300 elements


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gpu_matches_cpu(cuda, case, dtype):
    cls, options, steps = case
    rng = np.random.default_rng(1)
    host_params = random_arrays(rng, SHAPES, dtype)
    dev_params = [cuda.to_device(p) for p in host_params]
    host_opt, dev_opt = cls(host_params, **options), cls(dev_params, **options)
    for t in range(steps):
        grads = random_arrays(rng, SHAPES, dtype)
        host_opt.step(grads)
        dev_opt.step([cuda.to_device(g) for g in grads])
        compare_params_and_state(host_opt, dev_opt, host_params, dev_params, dtype, f"after step {t + 1}")


def test_groups_single_array_and_skipped_grads(cuda):
    """Group dicts, a bare device array as params, and ``None`` gradients work as on the host."""
    rng = np.random.default_rng(2)
    w, b = random_arrays(rng, SHAPES, np.float32)
    dw, db = cuda.to_device(w), cuda.to_device(b)

    def groups(ps):
        return [{"params": [ps[0]], "weight_decay": 0.1}, {"params": ps[1], "lr": 0.05}]

    host_opt, dev_opt = fo.AdamW(groups([w, b])), fo.AdamW(groups([dw, db]))
    for t in range(3):
        gw, gb = random_arrays(rng, SHAPES, np.float32)
        host_opt.step([[gw], [None if t == 1 else gb]])
        dev_opt.step([[cuda.to_device(gw)], [None if t == 1 else cuda.to_device(gb)]])
    compare_params_and_state(host_opt, dev_opt, [w, b], [dw, db], np.float32, "after 3 steps")

    single = cuda.to_device(w.copy())
    opt = fo.SGD(single, lr=0.5)
    opt.step(cuda.to_device(np.ones_like(w)))
    np.testing.assert_allclose(single.copy_to_host(), w - 0.5, rtol=1e-6)


def test_updates_in_place_and_state_on_device(cuda):
    p = cuda.to_device(np.zeros(37, np.float32))
    opt = fo.Adam([p], lr=0.1)
    opt.step([cuda.to_device(np.ones(37, np.float32))])
    np.testing.assert_allclose(p.copy_to_host(), np.full(37, -0.1, np.float32), rtol=1e-6)
    for buf in (opt.state[0]["exp_avg"], opt.state[0]["exp_avg_sq"]):
        assert not isinstance(buf, np.ndarray) and buf.shape == (37,) and buf.dtype == np.float32


def test_initial_state_value_is_filled_on_device(cuda):
    p = cuda.to_device(np.zeros((20, 15), np.float64))
    opt = fo.Adagrad([p], initial_accumulator_value=0.25)
    np.testing.assert_array_equal(opt.state[0]["sum"].copy_to_host(), np.full((20, 15), 0.25))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_state_dict_round_trip(cuda, dtype):
    """state_dict() gives host NumPy arrays; load_state_dict() puts them on the device; a
    device optimizer resumed from a host one's state continues exactly like it."""
    rng = np.random.default_rng(4)
    host_params = random_arrays(rng, SHAPES, dtype)
    dev_params = [cuda.to_device(p) for p in host_params]
    host_opt = fo.RMSprop(host_params, lr=0.01, momentum=0.9, centered=True)
    dev_opt = fo.RMSprop(dev_params, lr=0.01, momentum=0.9, centered=True)
    for _ in range(2):
        host_opt.step(random_arrays(rng, SHAPES, dtype))
    sd = host_opt.state_dict()
    for k in ("square_avg", "grad_avg", "momentum_buffer"):
        sd["state"][0][k] = sd["state"][0][k] + 0.5  # an edited value must arrive as edited
    host_opt.load_state_dict(sd)
    dev_opt.load_state_dict(sd)
    for h, d in zip(host_params, dev_params):
        d.copy_to_device(h)
    compare_params_and_state(host_opt, dev_opt, host_params, dev_params, dtype, "after loading")
    out = dev_opt.state_dict()
    for i in (0, 1):
        for k, v in out["state"][i].items():
            if k != "step":
                assert type(v) is np.ndarray and v.shape == SHAPES[i] and v.dtype == dtype
                np.testing.assert_array_equal(v, sd["state"][i][k])
    grads = random_arrays(rng, SHAPES, dtype)
    host_opt.step(grads)
    dev_opt.step([cuda.to_device(g) for g in grads])
    compare_params_and_state(host_opt, dev_opt, host_params, dev_params, dtype, "a step after loading")


def test_option_switched_on_later_allocates_on_device(cuda):
    """Momentum turned on between steps creates its buffer on the device, as on the host."""
    rng = np.random.default_rng(5)
    host_params = random_arrays(rng, SHAPES, np.float32)
    dev_params = [cuda.to_device(p) for p in host_params]
    host_opt, dev_opt = fo.SGD(host_params, lr=0.1), fo.SGD(dev_params, lr=0.1)
    for t in range(3):
        if t == 1:
            host_opt.param_groups[0]["momentum"] = dev_opt.param_groups[0]["momentum"] = 0.9
        grads = random_arrays(rng, SHAPES, np.float32)
        host_opt.step(grads)
        dev_opt.step([cuda.to_device(g) for g in grads])
    compare_params_and_state(host_opt, dev_opt, host_params, dev_params, np.float32, "after 3 steps")
