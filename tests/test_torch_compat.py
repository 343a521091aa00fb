"""Moving a run between fastopt and torch.optim: state dicts converted both ways, then both
optimizers continue and must agree (parameters and every state buffer)."""

import numpy as np
import pytest
from registry import TORCH_CASES

import fastopt as fo
from fastopt.torch_compat import from_torch_state_dict, to_torch_state_dict

torch = pytest.importorskip("torch")

SHAPES = [(5, 13), (31,), ()]
TOL = {"rtol": 2e-5, "atol": 1e-6}


def grads_for(rng, shapes):
    return [np.asarray(rng.standard_normal(s) + 0.1, dtype=np.float32) for s in shapes]


def torch_step(topt, tparams, grads):
    for tp, g in zip(tparams, grads):
        tp.grad = torch.from_numpy(g.copy())
    topt.step()


def assert_same(params, state_of, tparams, topt, where):
    for i, (p, tp) in enumerate(zip(params, tparams)):
        np.testing.assert_allclose(p, tp.detach().numpy(), **TOL, err_msg=f"{where}: param {i}")
        tstate, ours = topt.state[tp], state_of(i)
        for name, value in tstate.items():
            if name == "step":
                assert ours["step"] == int(value), f"{where}: param {i} step"
            else:
                np.testing.assert_allclose(ours[name], value.numpy() if torch.is_tensor(value) else value,
                                           **TOL, err_msg=f"{where}: param {i} {name}")


def make_pair(case, rng):
    params = [np.asarray(rng.standard_normal(s), dtype=np.float32) for s in SHAPES]
    tparams = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    topt = getattr(torch.optim, case.torch_cls)(tparams, foreach=False, **case.torch_options)
    return params, case.make(params), tparams, topt


def copy_params(src, dst):
    with torch.no_grad():
        for s, d in zip(src, dst):
            if torch.is_tensor(d):
                d.copy_(torch.from_numpy(np.asarray(s)))
            else:
                d[...] = s.detach().numpy()


@pytest.mark.parametrize("case", TORCH_CASES, ids=[c.id for c in TORCH_CASES])
def test_torch_to_fastopt_and_continue(case, rng):
    params, opt, tparams, topt = make_pair(case, rng)
    for _ in range(3):
        torch_step(topt, tparams, grads_for(rng, SHAPES))
    from_torch_state_dict(opt, topt.state_dict())
    copy_params(tparams, params)
    assert opt.step_count == (0 if case.torch_cls == "SGD" else 3)  # torch.optim.SGD keeps no step
    for _ in range(3):
        g = grads_for(rng, SHAPES)
        torch_step(topt, tparams, g)
        opt.step(g)
    assert_same(params, lambda i: opt.state[i], tparams, topt, case.id)


@pytest.mark.parametrize("case", TORCH_CASES, ids=[c.id for c in TORCH_CASES])
def test_fastopt_to_torch_and_continue(case, rng):
    params, opt, tparams, topt = make_pair(case, rng)
    for _ in range(3):
        opt.step(grads_for(rng, SHAPES))
    topt.load_state_dict(to_torch_state_dict(opt))
    copy_params(params, tparams)
    for _ in range(3):
        g = grads_for(rng, SHAPES)
        torch_step(topt, tparams, g)
        opt.step(g)
    assert_same(params, lambda i: opt.state[i], tparams, topt, case.id)


@pytest.mark.parametrize("direction", ["torch->fastopt", "fastopt->torch"])
def test_flat_params_in_two_groups_round_trip(direction, rng):
    shapes = {"enc.w": (6, 4), "enc.b": (4,), "dec.w": (4, 3), "dec.b": (3,)}
    flat = fo.FlatParams(shapes)
    for n in flat:
        flat[n][...] = rng.standard_normal(flat[n].shape)
    weights, biases = flat.select("*.w"), flat.select("*.b")
    order = weights.names + biases.names  # torch numbers parameters group by group
    tparams = {n: torch.tensor(flat[n].copy(), requires_grad=True) for n in order}
    opt = fo.AdamW([{"params": weights, "weight_decay": 0.1}, {"params": biases, "weight_decay": 0.0}],
                   lr=0.01, amsgrad=True)
    topt = torch.optim.AdamW([{"params": [tparams[n] for n in weights.names], "weight_decay": 0.1},
                              {"params": [tparams[n] for n in biases.names], "weight_decay": 0.0}],
                             lr=0.01, amsgrad=True, foreach=False)

    def both_step(who):
        g = {n: rng.standard_normal(shapes[n]).astype(np.float32) for n in order}
        if "torch" in who:
            torch_step(topt, [tparams[n] for n in order], [g[n] for n in order])
        if "fastopt" in who:
            grads = flat.zeros_like()
            for n in order:
                grads[n][...] = g[n]
            opt.step(grads)

    first = direction.split("->")[0]
    for _ in range(3):
        both_step(first)
    if first == "torch":
        from_torch_state_dict(opt, topt.state_dict())
        copy_params([tparams[n] for n in order], [flat[n] for n in order])
    else:
        sd = to_torch_state_dict(opt)
        assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2, 3]]
        topt.load_state_dict(sd)
        copy_params([flat[n] for n in order], [tparams[n] for n in order])
    for _ in range(3):
        both_step("torch fastopt")
    assert_same([flat[n] for n in order], lambda i: opt.state[order[i]], [tparams[n] for n in order], topt,
                direction)


def test_sgd_momentum_not_started_in_torch_starts_from_the_next_gradient(rng):
    params = [np.asarray(rng.standard_normal(s), dtype=np.float32) for s in SHAPES]
    tparams = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    topt = torch.optim.SGD(tparams, lr=0.1, momentum=0.9)
    opt = fo.SGD(params, lr=0.1, momentum=0.9)
    opt.step(grads_for(rng, SHAPES))  # fastopt has started; torch, with no steps, has not
    copy_params(tparams, params)
    from_torch_state_dict(opt, topt.state_dict())
    assert opt.state[0]["momentum_started"] is False and opt.step_count == 0
    for _ in range(2):
        g = grads_for(rng, SHAPES)
        torch_step(topt, tparams, g)
        opt.step(g)
    assert_same(params, lambda i: opt.state[i], tparams, topt, "sgd")
    assert to_torch_state_dict(fo.SGD(params, lr=0.1, momentum=0.9))["state"] == {}


def test_schedules_are_kept_on_load_and_evaluated_on_export(rng):
    params = [np.zeros(3, np.float32)]
    schedule = lambda step: 0.5 / (1 + step)
    opt = fo.Adam(params, lr=schedule)
    opt.step([np.ones(3, np.float32)])
    assert to_torch_state_dict(opt)["param_groups"][0]["lr"] == pytest.approx(0.25)
    tp = torch.zeros(3, requires_grad=True)
    topt = torch.optim.Adam([tp], lr=0.01)
    from_torch_state_dict(opt, topt.state_dict())
    assert opt.param_groups[0]["lr"] is schedule


def test_bad_torch_state_dicts_change_nothing(rng):
    _, opt, tparams, topt = make_pair(next(c for c in TORCH_CASES if c.id == "adam"), rng)
    opt.step(grads_for(rng, SHAPES))
    before = [{k: np.copy(v) for k, v in e.items()} for e in opt.state]
    torch_step(topt, tparams, grads_for(rng, SHAPES))
    good = topt.state_dict()
    sgd = torch.optim.SGD(tparams, lr=0.1, momentum=0.9)
    torch_step(sgd, tparams, grads_for(rng, SHAPES))

    def edited(fn):
        sd = topt.state_dict()
        sd = {"state": {k: dict(v) for k, v in sd["state"].items()},
              "param_groups": [dict(g) for g in sd["param_groups"]]}
        fn(sd)
        return sd

    bad = [
        ({"state": {}}, TypeError, "'state' and 'param_groups'"),
        (sgd.state_dict(), ValueError, "momentum_buffer, which fastopt.Adam"),
        (edited(lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0]))), ValueError, "2 param groups"),
        (edited(lambda sd: sd["param_groups"][0].__setitem__("params", [0, 1])), ValueError, "has 2 parameters"),
        (edited(lambda sd: sd["state"][1].__setitem__("exp_avg", torch.zeros(4))), ValueError, "shape"),
        (edited(lambda sd: sd["state"][1].__setitem__("step", torch.tensor(-1.0))), ValueError, "step"),
        (edited(lambda sd: sd["param_groups"][0].__setitem__("betas", (1.5, 0.9))), ValueError, "beta"),
    ]
    for sd, exc, match in bad:
        with pytest.raises(exc, match=match):
            from_torch_state_dict(opt, sd)
        for e, b in zip(opt.state, before):
            for k, v in b.items():
                np.testing.assert_array_equal(e[k], v)
    from_torch_state_dict(opt, good)
    assert opt.state[0]["step"] == 1


def test_options_torch_lacks_cannot_be_exported():
    opt = fo.SGD([np.zeros(2, np.float32)], lr=0.1, momentum=0.9, momentum_init="zero")
    with pytest.raises(ValueError, match="momentum_init='zero'"):
        to_torch_state_dict(opt)
    opt = fo.RMSprop([np.zeros(2, np.float32)], eps_inside_sqrt=True)
    with pytest.raises(ValueError, match="eps_inside_sqrt=True"):
        to_torch_state_dict(opt)
    with pytest.raises(TypeError, match="fastopt optimizer"):
        to_torch_state_dict(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
