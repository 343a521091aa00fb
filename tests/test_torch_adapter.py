"""``fastopt.torch``: fastopt's kernels as ``torch.optim.Optimizer`` subclasses.

A small ``torch.nn`` model trained with ``fot.X`` follows ``torch.optim.X``'s trajectory for
every option set of ``registry.py`` (float64 to 1e-10, float32 to float32 precision), with lr
schedulers, param groups, state-dict round trips in both directions, torch's call conventions
and hooks, zero-copy steps, and clear errors before any change for what it cannot update.
"""

import copy
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from registry import CASES, TORCH_CASES

torch = pytest.importorskip("torch")

import fastopt as fo  # noqa: E402
import fastopt.torch as fot  # noqa: E402

STEPS = 50
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-11), torch.float32: dict(rtol=2e-4, atol=2e-5)}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(dtype)


def twin(model):
    other = copy.deepcopy(model)
    for a, b in zip(model.parameters(), other.parameters()):
        assert a.data_ptr() != b.data_ptr()
    return other


def data(dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, 6, generator=g, dtype=dtype), torch.randn(64, 3, generator=g, dtype=dtype)


def loss_of(model, x, y):
    return torch.log1p((model(x) - y) ** 2).mean()  # bounded gradients: ascent (maximize) stays tame


def train_step(model, opt, x, y, sign=1.0):
    opt.zero_grad()
    loss = sign * loss_of(model, x, y)
    loss.backward()
    opt.step()
    return loss.item()


def assert_same_params(model_a, model_b, dtype, what=""):
    for i, (a, b) in enumerate(zip(model_a.parameters(), model_b.parameters())):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), **TOL[dtype], err_msg=f"param {i} {what}")


def assert_same_state(opt, topt, dtype):
    for i, (p, tp) in enumerate(zip(fot_params(opt), fot_params(topt))):
        ours, theirs = opt.state[p], topt.state[tp]
        assert set(ours) == set(theirs), f"param {i}: state {sorted(ours)} vs torch's {sorted(theirs)}"
        for name, value in theirs.items():
            np.testing.assert_allclose(ours[name].numpy(), value.numpy(), **TOL[dtype], err_msg=f"param {i} {name}")


def fot_params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


@pytest.fixture
def default_dtype():
    previous = torch.get_default_dtype()
    yield
    torch.set_default_dtype(previous)


# -- trajectories -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", TORCH_CASES, ids=[c.id for c in TORCH_CASES])
def test_trajectory_matches_torch(case, dtype, default_dtype):
    # torch keeps scalar state (step, NAdam's mu_product) in the default dtype.
    torch.set_default_dtype(dtype)
    model = make_model(dtype)
    tmodel = twin(model)
    opt = getattr(fot, case.cls.__name__)(model.parameters(), **case.options)
    topt = getattr(torch.optim, case.torch_cls)(tmodel.parameters(), foreach=False, **case.torch_options)
    assert isinstance(opt, torch.optim.Optimizer)
    sign = -1.0 if case.options.get("maximize") else 1.0  # maximize the negated loss: a well-posed ascent
    for t in range(STEPS):
        x, y = data(dtype, seed=t)  # a new minibatch each step
        train_step(model, opt, x, y, sign)
        train_step(tmodel, topt, x, y, sign)
        assert_same_params(model, tmodel, dtype, f"step {t + 1}")
    assert_same_state(opt, topt, dtype)


FASTOPT_ONLY_CASES = [c for c in CASES if c.torch_cls is None]


@pytest.mark.parametrize("case", FASTOPT_ONLY_CASES, ids=[c.id for c in FASTOPT_ONLY_CASES])
def test_fastopt_only_options_match_fastopt(case):
    """Option sets torch lacks: ``fot.X`` gives exactly ``fastopt.X``'s numbers on NumPy arrays."""
    model = make_model()
    ref = [p.detach().numpy().copy() for p in model.parameters()]
    opt = getattr(fot, case.cls.__name__)(model.parameters(), **case.options)
    fopt = case.make(ref)
    x, y = data(torch.float64)
    for _ in range(10):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        grads = [p.grad.numpy().copy() for p in model.parameters()]
        opt.step()
        fopt.step(grads)
        for a, b in zip(model.parameters(), ref):
            np.testing.assert_array_equal(a.detach().numpy(), b)


def test_every_fastopt_optimizer_is_adapted():
    exported = {n for n in fo.__all__ if isinstance(getattr(fo, n), type)
                and issubclass(getattr(fo, n), fo.Optimizer) and getattr(fo, n) is not fo.Optimizer}
    assert exported, "fastopt exports no optimizers?"
    adapted = {n for n in fot.__all__ if isinstance(getattr(fot, n), type)
               and issubclass(getattr(fot, n), fot.TorchOptimizer) and getattr(fot, n) is not fot.TorchOptimizer}
    assert adapted == exported
    for name in adapted:
        cls = getattr(fot, name)
        assert issubclass(cls, torch.optim.Optimizer) and cls._fastopt_cls is getattr(fo, name)


def test_factory_adapts_a_new_rule():
    """A fastopt optimizer class the module has never seen gets a working adapter."""

    class Slow(fo.SGD):
        pass

    cls = fot.adapter_class(Slow)
    assert cls.__name__ == "Slow" and issubclass(cls, torch.optim.Optimizer)
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = cls(model.parameters(), lr=0.5)
    x, y = data(torch.float64)
    train_step(model, opt, x, y)
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), b - 0.5 * p.grad, rtol=1e-12, atol=1e-14)
    with pytest.raises(TypeError, match="fastopt optimizer class"):
        fot.adapter_class(torch.optim.SGD)


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "Adadelta", "RMSprop", "Adam", "AdamW", "Adamax", "NAdam", "RAdam"])
def test_positional_options_and_defaults_follow_torch(name):
    tcls = getattr(torch.optim, name)
    model = make_model()
    import inspect

    positional = [k for k, p in list(inspect.signature(tcls.__init__).parameters.items())[2:]
                  if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD][:2]
    values = [0.25, 0.5][: len(positional)]
    if positional and positional[1:] == ["betas"]:
        values[1] = (0.5, 0.75)
    opt = getattr(fot, name)(model.parameters(), *values)
    topt = tcls(make_model().parameters(), *values)
    for key, value in opt.param_groups[0].items():
        if key in topt.param_groups[0] and key != "params":
            assert topt.param_groups[0][key] == value, (key, value, topt.param_groups[0][key])
    with pytest.raises(TypeError, match="positional"):
        getattr(fot, name)(model.parameters(), *([0.1] * 12))


# -- schedulers and param groups ------------------------------------------------------------
SCHEDULERS = {
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20),
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5),
    "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + t)),
    "plateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=1, threshold=0.5),
}


@pytest.mark.parametrize("name", ["Adam", "SGD", "RMSprop"])
@pytest.mark.parametrize("sched", list(SCHEDULERS))
def test_lr_schedulers(name, sched):
    model = make_model()
    tmodel = twin(model)
    options = {"lr": 0.05, "momentum": 0.9} if name == "SGD" else {"lr": 0.05}
    opt = getattr(fot, name)(model.parameters(), **options)
    topt = getattr(torch.optim, name)(tmodel.parameters(), foreach=False, **options)
    s, ts = SCHEDULERS[sched](opt), SCHEDULERS[sched](topt)
    x, y = data(torch.float64)
    lrs = set()
    for t in range(STEPS):
        loss = train_step(model, opt, x, y)
        tloss = train_step(tmodel, topt, x, y)
        s.step(loss) if sched == "plateau" else s.step()
        ts.step(tloss) if sched == "plateau" else ts.step()
        assert opt.param_groups[0]["lr"] == topt.param_groups[0]["lr"]
        lrs.add(opt.param_groups[0]["lr"])
        assert_same_params(model, tmodel, torch.float64, f"step {t + 1}")
    assert len(lrs) > 2, "the schedule never changed the learning rate"


def test_param_groups_and_add_param_group_mid_training():
    model = make_model()
    tmodel = twin(model)
    first, second = model[0], model[2]
    tfirst, tsecond = tmodel[0], tmodel[2]
    opt = fot.AdamW([{"params": [first.weight], "weight_decay": 0.1},
                     {"params": [first.bias], "weight_decay": 0.0, "lr": 0.02}], lr=0.01)
    topt = torch.optim.AdamW([{"params": [tfirst.weight], "weight_decay": 0.1},
                              {"params": [tfirst.bias], "weight_decay": 0.0, "lr": 0.02}], lr=0.01, foreach=False)
    x, y = data(torch.float64)
    for t in range(STEPS):
        if t == 20:
            opt.add_param_group({"params": list(second.parameters()), "lr": 0.03, "betas": (0.8, 0.9)})
            topt.add_param_group({"params": list(tsecond.parameters()), "lr": 0.03, "betas": (0.8, 0.9)})
            assert len(opt.param_groups) == 3 and opt.param_groups[2]["weight_decay"] == 1e-2
        if t == 30:
            for g, tg in zip(opt.param_groups, topt.param_groups):
                g["lr"] *= 0.5
                tg["lr"] *= 0.5
        train_step(model, opt, x, y)
        train_step(tmodel, topt, x, y)
        assert_same_params(model, tmodel, torch.float64, f"step {t + 1}")
    assert_same_state(opt, topt, torch.float64)


def test_named_parameters_and_frozen_parameters():
    model = make_model()
    tmodel = twin(model)
    model[0].bias.requires_grad_(False)
    tmodel[0].bias.requires_grad_(False)
    opt = fot.Adam(model.named_parameters(), lr=0.01)
    topt = torch.optim.Adam(tmodel.named_parameters(), lr=0.01, foreach=False)
    assert opt.param_groups[0]["param_names"] == topt.param_groups[0]["param_names"]
    bias = model[0].bias.detach().clone()
    x, y = data(torch.float64)
    for _ in range(5):
        train_step(model, opt, x, y)
        train_step(tmodel, topt, x, y)
    assert_same_params(model, tmodel, torch.float64)
    assert torch.equal(model[0].bias, bias) and opt.state[model[0].bias] == {}
    assert opt.state_dict()["param_groups"][0]["param_names"] == topt.state_dict()["param_groups"][0]["param_names"]


# -- state dicts ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [c for c in TORCH_CASES if c.id in ("adam-amsgrad", "sgd-momentum", "nadam-wd",
                                                                     "rmsprop-centered-momentum", "adagrad")],
                         ids=lambda c: c.id)
def test_state_dict_round_trip_fot_torch_fot(case, default_dtype):
    torch.set_default_dtype(torch.float64)
    model = make_model()
    tmodel = twin(model)
    fcls, tcls = getattr(fot, case.cls.__name__), getattr(torch.optim, case.torch_cls)
    opt = fcls(model.parameters(), **case.options)
    x, y = data(torch.float64)
    for _ in range(7):
        train_step(model, opt, x, y)
    # fot -> torch: torch continues where fot stopped
    with torch.no_grad():
        for a, b in zip(model.parameters(), tmodel.parameters()):
            b.copy_(a)
    topt = tcls(tmodel.parameters(), foreach=False, **case.torch_options)
    topt.load_state_dict(opt.state_dict())
    for t in range(7):
        train_step(model, opt, x, y)
        train_step(tmodel, topt, x, y)
        assert_same_params(model, tmodel, torch.float64, f"after fot->torch, step {t + 1}")
    # torch -> fot: a fresh fot optimizer continues where torch is
    model2 = twin(tmodel)
    opt2 = fcls(model2.parameters(), lr=123.0)
    opt2.load_state_dict(topt.state_dict())
    assert opt2.param_groups[0]["lr"] == topt.param_groups[0]["lr"]
    for t in range(7):
        train_step(model2, opt2, x, y)
        train_step(tmodel, topt, x, y)
        assert_same_params(model2, tmodel, torch.float64, f"after torch->fot, step {t + 1}")
    assert_same_state(opt2, topt, torch.float64)


def test_state_dict_keeps_fastopt_only_options():
    model = make_model()
    opt = fot.RMSprop(model.parameters(), lr=0.01, eps_inside_sqrt=True, eps=1e-6, momentum=0.5)
    x, y = data(torch.float64)
    for _ in range(3):
        train_step(model, opt, x, y)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["eps_inside_sqrt"] is True
    model2 = twin(model)
    opt2 = fot.RMSprop(model2.parameters())
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["eps_inside_sqrt"] is True and opt2.param_groups[0]["momentum"] == 0.5
    for _ in range(4):
        train_step(model, opt, x, y)
        train_step(model2, opt2, x, y)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_scheduler_resumes_from_state_dict_as_with_torch():
    """A scheduler resumed with ``last_epoch`` needs ``initial_lr`` in the loaded groups."""
    lrs = {}
    for kind, cls in (("fot", fot.SGD), ("torch", torch.optim.SGD)):
        model = make_model()
        opt = cls(model.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        x, y = data(torch.float64)
        for _ in range(5):
            train_step(model, opt, x, y)
            sched.step()
        opt2 = cls(twin(model).parameters(), lr=0.1, momentum=0.9)
        opt2.load_state_dict(opt.state_dict())
        sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5, last_epoch=4)
        sched2.load_state_dict(sched.state_dict())
        seen = [opt2.param_groups[0]["lr"]]
        for _ in range(5):
            opt2.step()
            sched2.step()
            seen.append(opt2.param_groups[0]["lr"])
        lrs[kind] = seen
    assert lrs["fot"] == lrs["torch"] and len(set(lrs["fot"])) > 1


def test_load_state_dict_checks_before_changing(default_dtype):
    model = make_model()
    opt = fot.Adam(model.parameters(), lr=0.01)
    x, y = data(torch.float64)
    train_step(model, opt, x, y)
    before = opt.state_dict()
    bad = opt.state_dict()
    bad["state"][3]["exp_avg"] = torch.zeros(7)  # wrong shape, last parameter
    bad["param_groups"][0]["lr"] = 0.5
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(bad)
    assert opt.param_groups[0]["lr"] == 0.01
    sgd = {"state": {i: {"momentum_buffer": torch.zeros(p.shape)} for i, p in enumerate(model.parameters())},
           "param_groups": [{**before["param_groups"][0]}]}
    with pytest.raises(ValueError, match="momentum_buffer"):  # another optimizer's state
        opt.load_state_dict(sgd)
    with pytest.raises(ValueError, match="param groups"):
        opt.load_state_dict({"state": {}, "param_groups": []})
    after = opt.state_dict()
    for i in before["state"]:
        for k in before["state"][i]:
            assert torch.equal(before["state"][i][k], after["state"][i][k])


# -- torch's conventions ------------------------------------------------------------------------
def test_closure_hooks_zero_grad_and_none_grads():
    model = make_model()
    opt = fot.SGD(model.parameters(), lr=0.1)
    x, y = data(torch.float64)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o)))

    def closure():
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    with torch.no_grad():  # the closure runs with grad enabled, as in torch
        loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.item() > 0
    assert calls == [("pre", opt), ("post", opt)]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert opt.step() is None  # no gradients: nothing moves
    loss_of(model, x, y).backward()
    model[2].weight.grad = None
    frozen = model[2].weight.detach().clone()
    moved = model[0].weight.detach().clone()
    opt.step()
    assert torch.equal(model[2].weight, frozen) and not torch.equal(model[0].weight, moved)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_step_bumps_autograd_versions():
    """Parameters updated by a step count as modified in place, as with torch.optim: a backward
    through a graph that saved them fails instead of using stale values."""
    model = make_model()
    opt = fot.Adam(model.parameters(), lr=0.01)
    x, y = data(torch.float64)
    loss_of(model, x, y).backward()
    versions = [p._version for p in model.parameters()]
    graph = loss_of(model, x, y)
    opt.step()
    assert all(p._version > v for p, v in zip(model.parameters(), versions))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        graph.backward()


def test_replaced_storage_is_rebound_with_its_state():
    model = make_model()
    tmodel = twin(model)
    opt = fot.Adam(model.parameters(), lr=0.01)
    topt = torch.optim.Adam(tmodel.parameters(), lr=0.01, foreach=False)
    x, y = data(torch.float64)
    for t in range(6):
        if t == 3:
            for m in (model, tmodel):
                m[0].weight.data = m[0].weight.data.clone()
        train_step(model, opt, x, y)
        train_step(tmodel, topt, x, y)
        assert_same_params(model, tmodel, torch.float64, f"step {t + 1}")
    assert_same_state(opt, topt, torch.float64)


def test_state_is_live_and_pickling_is_refused():
    model = make_model()
    opt = fot.Adam(model.parameters(), lr=0.01)
    assert len(opt.state) == 0
    x, y = data(torch.float64)
    train_step(model, opt, x, y)
    p = model[0].weight
    m = opt.state[p]["exp_avg"]
    snapshot = m.clone()
    train_step(model, opt, x, y)
    assert not torch.equal(m, snapshot)  # a view of the live buffer
    assert int(opt.state[p]["step"]) == 2 and len(opt.state) == 4
    with pytest.raises(KeyError):
        opt.state[torch.zeros(1)]
    with pytest.raises(TypeError, match="state_dict"):
        copy.deepcopy(opt)


# -- zero copy ------------------------------------------------------------------------------
def test_step_is_zero_copy():
    """A step on ~2e6 float32 parameters updates them at their addresses, reads the current
    p.grad, and allocates nothing of parameter size (tracemalloc sees NumPy's allocations)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.Linear(1000, 1000))
    opt = fot.Adam(model.parameters(), lr=1e-3)
    ptrs = [p.data_ptr() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # compile, allocate nothing new later
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)  # a fresh tensor, as after zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in model.parameters()]
    tracemalloc.start()
    try:
        opt.step()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < largest / 100, f"a step allocated {peak} bytes (the largest parameter has {largest})"
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    buffers = [opt.state[p]["exp_avg"] for p in model.parameters()]
    torch.testing.assert_close(buffers[0], torch.full_like(buffers[0], 0.1 * 0.5 + 0.09 * 1.0), rtol=1e-6, atol=0)


# -- bad input ------------------------------------------------------------------------------
def _noncontiguous():
    return torch.nn.Parameter(torch.zeros(4, 3).t())


def _overlapping():
    base = torch.zeros(10)
    return [torch.nn.Parameter(base[:6]), torch.nn.Parameter(base[4:])]


def _view_of_another():
    p = torch.nn.Parameter(torch.zeros(4, 3))
    return [p, torch.nn.Parameter(p.data[1])]


def _sparse_param():
    return torch.nn.Parameter(torch.zeros(3, 3).to_sparse())


def _twice():
    p = torch.nn.Parameter(torch.zeros(3))
    return [p, p]


def _two_groups():
    p = torch.nn.Parameter(torch.zeros(3))
    return [{"params": [p]}, {"params": [p]}]


def _non_leaf():
    return [torch.zeros(3, requires_grad=True) * 2]


CONSTRUCTION_ERRORS = [
    ("float16", lambda: [torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))], {}, TypeError, "issue 16"),
    ("bfloat16", lambda: [torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))], {}, TypeError, "low-precision"),
    ("complex", lambda: [torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))], {}, TypeError, "complex"),
    ("integer", lambda: [torch.zeros(3, dtype=torch.int64)], {}, TypeError, "int64"),
    ("not-a-tensor", lambda: [np.zeros(3)], {}, TypeError, "torch.Tensor"),
    ("non-contiguous", lambda: [_noncontiguous()], {}, ValueError, "not contiguous"),
    ("sparse-param", lambda: [_sparse_param()], {}, TypeError, "layout"),
    ("overlapping", _overlapping, {}, ValueError, "share memory"),
    ("view-of-another", _view_of_another, {}, ValueError, "share memory"),
    ("twice", _twice, {}, ValueError, "appear once"),
    ("two-groups", _two_groups, {}, ValueError, "appear once"),
    ("meta-device", lambda: [torch.zeros(3, requires_grad=True), torch.zeros(3, device="meta", requires_grad=True)],
     {}, TypeError, "meta"),
    ("non-leaf", _non_leaf, {}, ValueError, "non-leaf"),
    ("bad-lr", lambda: [torch.nn.Parameter(torch.zeros(3))], {"lr": -1.0}, ValueError, "learning rate"),
    ("callable-lr", lambda: [torch.nn.Parameter(torch.zeros(3))], {"lr": lambda t: 0.1}, TypeError, "lr_scheduler"),
    ("capturable", lambda: [torch.nn.Parameter(torch.zeros(3))], {"capturable": True}, ValueError, "capturable"),
    ("unknown", lambda: [torch.nn.Parameter(torch.zeros(3))], {"clip_grad_norm": 1.0}, TypeError, "clip_grad_norm"),
    ("bad-beta", lambda: [torch.nn.Parameter(torch.zeros(3))], {"betas": (1.5, 0.9)}, ValueError, "beta"),
]


@pytest.mark.parametrize("make,options,error,match", [c[1:] for c in CONSTRUCTION_ERRORS],
                         ids=[c[0] for c in CONSTRUCTION_ERRORS])
def test_construction_errors(make, options, error, match):
    with pytest.raises(error, match=match):
        fot.Adam(make(), **options)


def test_add_param_group_errors_change_nothing():
    model = make_model()
    opt = fot.Adam(model[0].parameters(), lr=0.01)
    x, y = data(torch.float64)
    train_step(model, opt, x, y)
    state = opt.state_dict()
    bad_groups = [
        {"params": [torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))]},
        {"params": [model[0].weight]},  # already in group 0
        {"params": [torch.nn.Parameter(model[0].weight.data[0])]},  # shares memory with group 0's weight
        {"params": list(model[2].parameters()), "lr": -0.1},
        {"params": list(model[2].parameters()), "betas": (0.9, 1.0)},
        {"params": [_noncontiguous()]},
    ]
    for group in bad_groups:
        with pytest.raises((TypeError, ValueError)):
            opt.add_param_group(group)
        assert len(opt.param_groups) == 1 and len(opt._refs) == 2
    after = opt.state_dict()
    for i in state["state"]:
        for k in state["state"][i]:
            assert torch.equal(state["state"][i][k], after["state"][i][k])


def _sparse_grad(p):
    p.grad = torch.zeros_like(p).to_sparse()


def _noncontiguous_grad(p):
    p.grad = torch.ones(p.shape[::-1], dtype=p.dtype).t()


def _half_grad(p):
    p.grad_dtype = None
    p.grad = torch.ones(p.shape, dtype=torch.float16)


def _other_dtype_grad(p):
    p.grad_dtype = None
    p.grad = torch.ones(p.shape, dtype=torch.float32)


def _grad_is_param(p):
    p.grad = p.data


STEP_ERRORS = [
    ("sparse-grad", _sparse_grad, TypeError, "sparse"),
    ("noncontiguous-grad", _noncontiguous_grad, ValueError, "not contiguous"),
    ("half-grad", _half_grad, TypeError, "issue 16"),
    ("other-dtype-grad", _other_dtype_grad, TypeError, "dtype"),
    ("grad-is-param", _grad_is_param, ValueError, "shares memory"),
    ("bad-lr-edit", lambda p: None, ValueError, "learning rate"),
]


@pytest.mark.parametrize("spoil,error,match", [c[1:] for c in STEP_ERRORS], ids=[c[0] for c in STEP_ERRORS])
def test_step_errors_change_nothing(spoil, error, match):
    model = make_model()
    opt = fot.Adam([{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}], lr=0.01)
    x, y = data(torch.float64)
    train_step(model, opt, x, y)
    opt.zero_grad()
    loss_of(model, x, y).backward()
    # the snapshot comes first: with an invalid option state_dict() raises too (it could not be loaded)
    state = {i: {k: v.clone() for k, v in s.items()} for i, s in opt.state_dict()["state"].items()}
    edit_lr = spoil is STEP_ERRORS[-1][1]
    if edit_lr:
        opt.param_groups[1]["lr"] = -1.0
    else:
        spoil(model[2].weight)  # the last group's: the first group must not have moved either
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match=match):
        opt.step()
    for p, b in zip(model.parameters(), params):
        assert torch.equal(p, b)
    if edit_lr:
        with pytest.raises(ValueError, match="learning rate"):
            opt.state_dict()
        opt.param_groups[1]["lr"] = 0.01
    after = opt.state_dict()["state"]
    for i in state:
        for k in state[i]:
            assert torch.equal(state[i][k], after[i][k]), (i, k)


def test_params_edited_in_place_are_refused():
    model = make_model()
    opt = fot.SGD(model.parameters(), lr=0.1)
    opt.param_groups[0]["params"].append(torch.nn.Parameter(torch.zeros(2)))
    with pytest.raises(ValueError, match="add_param_group"):
        opt.step()


# -- imports --------------------------------------------------------------------------------
def test_import_fastopt_never_imports_torch():
    code = ("import sys, numpy as np, fastopt as fo\n"
            "w = np.zeros(3); fo.Adam([w]).step([np.ones(3)])\n"
            "import fastopt.torch_compat\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)\n"
            "import fastopt.torch as fot, torch\n"
            "assert fot.torch is torch and not torch.__file__.startswith(fo.__path__[0]), torch.__file__\n"
            "assert isinstance(fot.Adam([torch.zeros(2, requires_grad=True)]), torch.optim.Optimizer)\n")
    env = {**os.environ, "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr


def test_tensor_lr_and_torch_only_flags():
    """torch's spellings: a 0-d tensor lr, and ``foreach``/``fused`` (accepted; the kernel is fused)."""
    model = make_model()
    tmodel = twin(model)
    opt = fot.Adam(model.parameters(), lr=torch.tensor(0.01, dtype=torch.float64), foreach=True, fused=None)
    topt = torch.optim.Adam(tmodel.parameters(), lr=0.01, foreach=False)
    x, y = data(torch.float64)
    for _ in range(5):
        train_step(model, opt, x, y)
        train_step(tmodel, topt, x, y)
    assert_same_params(model, tmodel, torch.float64)
    with pytest.raises(ValueError, match="differentiable"):
        fot.SGD(model.parameters(), differentiable=True)
    with pytest.raises(ValueError, match="one-element"):
        fot.SGD(model.parameters(), lr=torch.ones(2))
