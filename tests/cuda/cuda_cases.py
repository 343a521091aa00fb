"""The option sets the CUDA tests run: together they reach every rule variant (checked by
``test_cases_cover_every_variant``), each for enough steps to reach its later phases."""

from __future__ import annotations

import numpy as np

import fastopt as fo

# (optimizer class, options, steps)
CASES = [
    (fo.SGD, {"lr": 0.1}, 3),
    (fo.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}, 3),
    (fo.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}, 3),
    (fo.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.9, "momentum_init": "zero", "maximize": True}, 3),
    (fo.Adagrad, {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1}, 3),
    (fo.Adagrad, {"lr": 0.1, "eps_inside_sqrt": True, "weight_decay": 0.1}, 3),
    (fo.Adadelta, {"weight_decay": 0.01}, 3),
    (fo.RMSprop, {}, 3),
    (fo.RMSprop, {"centered": True}, 3),
    (fo.RMSprop, {"momentum": 0.9, "weight_decay": 0.01}, 3),
    (fo.RMSprop, {"centered": True, "momentum": 0.9, "eps_inside_sqrt": True}, 3),
    (fo.Adam, {"lr": 0.01, "weight_decay": 0.01}, 3),
    (fo.Adam, {"lr": 0.01, "amsgrad": True}, 3),
    (fo.Adam, {"lr": 0.01, "maximize": True}, 3),
    (fo.AdamW, {"lr": 0.01, "amsgrad": True}, 3),
    (fo.Adamax, {"lr": 0.01}, 3),
    (fo.NAdam, {}, 3),
    (fo.NAdam, {"decoupled_weight_decay": True, "weight_decay": 0.01}, 3),
    (fo.RAdam, {"weight_decay": 0.01}, 7),  # rho_t > 5 from step 6: both phases
]


def case_id(case) -> str:
    cls, options, _ = case
    return cls.__name__ + "".join(f"-{k}={v}" for k, v in options.items())


def hyper(case) -> dict:
    """The full validated hyper-parameters of a case, as its kernel module's ``plan`` reads them."""
    cls, options, _ = case
    module = cls.kernel
    return {**module.DEFAULTS, **cls.forced, **options}


def plans(case):
    """``(rule, scalars)`` of each step of ``case``, from the kernel module's own ``plan``."""
    cls, _, steps = case
    module = cls.kernel
    hp = hyper(case)
    host = getattr(module, "host_state", dict)()
    return [module.plan(hp, t, host) for t in range(1, steps + 1)]


def random_arrays(rng, shapes, dtype):
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


#: Device vs host tolerances: the same math, only FMA contraction and reduction order differ.
TOL = {np.float32: {"rtol": 2e-5, "atol": 1e-6}, np.float64: {"rtol": 1e-12, "atol": 1e-14}}


def compare_params_and_state(host_opt, dev_opt, host_params, dev_params, dtype, when):
    """The device optimizer's params and every state entry equal the host optimizer's."""
    for i, (h, d) in enumerate(zip(host_params, dev_params)):
        np.testing.assert_allclose(d.copy_to_host(), h, **TOL[dtype], err_msg=f"param {i} {when}")
    for i, (hs, ds) in enumerate(zip(host_opt.state, dev_opt.state)):
        assert set(hs) == set(ds)
        for k, v in hs.items():
            if isinstance(v, np.ndarray):
                np.testing.assert_allclose(ds[k].copy_to_host(), v, **TOL[dtype], err_msg=f"{k} {i} {when}")
            else:
                assert ds[k] == v, (k, when)
