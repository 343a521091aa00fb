"""Optimizers over a FlatParams: one launch for all groups, padding untouched, same numbers
as the per-array path and as a NumPy reference, name-keyed state."""

import numpy as np
import pytest

import fastopt as fo
from fastopt.kernels import _build

SHAPES = {"w1": (6, 5), "b1": (5,), "w2": (5, 3), "b2": (3,), "s": (), "e": (0,), "w3": (9,)}
WEIGHTS, BIASES = ["w1", "w2", "w3"], ["b1", "b2", "s", "e"]

# (class, options of group 0, options of group 1, steps). Every rule and variant appears.
CASES = [
    ("SGD", {"lr": 0.1}, {"weight_decay": 0.1}, 3),
    ("SGD", {"lr": 0.1, "momentum": 0.9}, {"dampening": 0.5}, 3),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}, {"weight_decay": 0.1}, 3),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.1}, {"initial_accumulator_value": 0.5}, 3),
    ("Adadelta", {}, {"rho": 0.5}, 3),
    ("RMSprop", {}, {"alpha": 0.5, "maximize": True}, 3),
    ("RMSprop", {"centered": True, "momentum": 0.5}, {"eps_inside_sqrt": True}, 3),
    ("Adam", {"lr": 0.01}, {"weight_decay": 0.1}, 3),
    ("Adam", {"lr": 0.01, "amsgrad": True}, {"betas": (0.5, 0.9)}, 3),
    ("AdamW", {"lr": 0.01}, {"weight_decay": 0.0}, 3),
    ("Adamax", {}, {"weight_decay": 0.1}, 3),
    ("NAdam", {}, {"decoupled_weight_decay": True, "weight_decay": 0.1}, 3),
    ("RAdam", {}, {"weight_decay": 0.1}, 8),  # both phases (rho_t > 5 from step 6)
]
IDS = [f"{c}-{'-'.join(map(str, o))}" for c, o, _, _ in CASES]


def make_flat(dtype=np.float32, seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    flat = fo.FlatParams(shapes, dtype)
    for name in flat:
        flat[name][...] = rng.standard_normal(flat[name].shape)
    return flat


def random_grads(flat, rng):
    grads = flat.zeros_like()
    for name in grads:
        grads[name][...] = rng.standard_normal(grads[name].shape)
    return grads


def count_launches(monkeypatch):
    calls = []
    real = _build.run_cpu

    def counting(rule, param, *args):
        calls.append((rule.name, param.size))
        real(rule, param, *args)

    monkeypatch.setattr(_build, "run_cpu", counting)
    return calls


@pytest.mark.parametrize("name, opts0, opts1, steps", CASES, ids=IDS)
def test_flat_groups_match_the_per_array_path_in_one_launch(name, opts0, opts1, steps, monkeypatch):
    cls = getattr(fo, name)
    flat = make_flat()
    arrays = {n: flat[n].copy() for n in flat}
    opt = cls([{"params": flat.select(*WEIGHTS), **opts1}, {"params": flat.select(*BIASES)}], **opts0)
    ref = cls([{"params": [arrays[n] for n in WEIGHTS], **opts1}, {"params": [arrays[n] for n in BIASES]}],
              **opts0)
    rng = np.random.default_rng(1)
    calls = count_launches(monkeypatch)
    for _ in range(steps):
        grads = random_grads(flat, rng)
        opt.step(grads)
        ref.step([grads[n].copy() for n in WEIGHTS + BIASES])
    same_variant = name != "Adam" or not opts0.get("amsgrad")
    flat_calls = [c for c in calls if c[1] == flat.buffer.size]
    if same_variant:
        assert len(flat_calls) == steps, calls  # one launch per step covers both groups
    for n in flat:
        np.testing.assert_allclose(flat[n], arrays[n], rtol=2e-6, atol=1e-7, err_msg=n)
    got, want = opt.state, ref.state
    for i, n in enumerate(WEIGHTS + BIASES):
        assert set(got[n]) == set(want[i])
        for key, value in want[i].items():
            np.testing.assert_allclose(got[n][key], value, rtol=2e-6, atol=1e-7, err_msg=f"{n} {key}")


def adam_reference(p, g, m, v, t, lr, b1, b2, eps, wd):
    """torch.optim.Adam's formula, in float64."""
    g = g + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    denom = np.sqrt(v) / np.sqrt(1 - b2**t) + eps
    return p - lr / (1 - b1**t) * m / denom, m, v


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 2e-5), (np.float64, 1e-12)])
def test_two_groups_against_a_numpy_reference(dtype, rtol):
    flat = make_flat(dtype)
    ref = {n: flat[n].astype(np.float64) for n in flat}
    mom = {n: (np.zeros_like(ref[n]), np.zeros_like(ref[n])) for n in flat}
    hp = {n: (1e-2, 0.1) if n in WEIGHTS else (3e-2, 0.0) for n in flat}
    opt = fo.Adam([{"params": flat.select("w*"), "weight_decay": 0.1},
                   {"params": flat.select(*BIASES), "lr": 3e-2}], lr=1e-2)
    rng = np.random.default_rng(2)
    for t in range(1, 5):
        grads = random_grads(flat, rng)
        opt.step(grads)
        for n in flat:
            lr, wd = hp[n]
            ref[n], m, v = adam_reference(ref[n], grads[n].astype(np.float64), *mom[n], t, lr, 0.9, 0.999, 1e-8, wd)
            mom[n] = (m, v)
    for n in flat:
        assert flat[n].dtype == dtype
        np.testing.assert_allclose(flat[n], ref[n], rtol=rtol, atol=rtol * 1e-2, err_msg=n)


def test_a_buffer_spanning_many_parallel_chunks_matches_the_per_array_path(monkeypatch):
    # > 2 chunks of _config.CHUNK elements, tensors and padding rows crossing chunk edges
    sizes = [70001, 3, 40000, 17, 65536, 1, 30000]
    flat = make_flat(shapes={f"t{i}": s for i, s in enumerate(sizes)})
    arrays = {n: flat[n].copy() for n in flat}
    names = list(flat)
    opt = fo.Adam([{"params": flat.select(*names[::2]), "lr": 1e-2},
                   {"params": flat.select(*names[1::2]), "weight_decay": 0.5}], lr=1e-3)
    ref = fo.Adam([{"params": [arrays[n] for n in names[::2]], "lr": 1e-2},
                   {"params": [arrays[n] for n in names[1::2]], "weight_decay": 0.5}], lr=1e-3)
    rng = np.random.default_rng(3)
    calls = count_launches(monkeypatch)
    for _ in range(2):
        grads = random_grads(flat, rng)
        opt.step(grads)
        ref.step([grads[n].copy() for n in names[::2]] + [grads[n].copy() for n in names[1::2]])
    assert calls.count(("adam", flat.buffer.size)) == 2
    for n in names:
        np.testing.assert_allclose(flat[n], arrays[n], rtol=2e-6, atol=1e-7, err_msg=n)


def all_variant_cases():
    """Options that reach every rule variant, with eps = 0 wherever a rule has eps."""
    return [
        ("SGD", {}), ("SGD", {"momentum": 0.9}), ("SGD", {"momentum": 0.9, "nesterov": True}),
        ("Adagrad", {"eps": 0.0}), ("Adagrad", {"eps": 0.0, "eps_inside_sqrt": True}),
        ("Adadelta", {"eps": 0.0}),
        ("RMSprop", {"eps": 0.0}), ("RMSprop", {"eps": 0.0, "centered": True}),
        ("RMSprop", {"eps": 0.0, "momentum": 0.5}), ("RMSprop", {"eps": 0.0, "centered": True, "momentum": 0.5}),
        ("Adam", {"eps": 0.0}), ("Adam", {"eps": 0.0, "amsgrad": True}), ("AdamW", {"eps": 0.0}),
        ("Adamax", {"eps": 0.0}), ("NAdam", {"eps": 0.0}), ("RAdam", {"eps": 0.0}),
    ]


@pytest.mark.parametrize("name, opts", all_variant_cases(), ids=lambda x: str(x))
def test_padding_never_changes_and_never_turns_nan(name, opts):
    flat = make_flat()
    pad = flat.layout.padding_mask()
    assert pad.sum() > 0
    flat.buffer[pad] = 7.0  # padding the user scribbled on stays as it is
    opt = getattr(fo, name)([{"params": flat.select(*WEIGHTS), "weight_decay": 0.1, "maximize": True},
                             {"params": flat.select(*BIASES)}], lr=0.1, **opts)
    rng = np.random.default_rng(4)
    raw = np.empty(flat.layout.size, np.float32)
    for _ in range(7):  # RAdam enters its adaptive phase at step 6
        raw[...] = rng.standard_normal(raw.size) * 1e3  # finite garbage in the padding too
        opt.step(raw)
    assert np.all(flat.buffer[pad] == 7.0)
    assert np.all(np.isfinite(flat.buffer))
    for key, buf in opt._flat.buffers.items():
        assert np.all(np.isfinite(buf))
        # the padding's gradient is scaled to 0, so its state stays at rest: 0, except
        # Adamax's u = max(beta2 * u, |0| + eps) with the padding rows' eps = 1
        rest = 1.0 if key == "exp_inf" else 0.0
        assert np.all(buf[pad] == rest), key


def test_tensors_in_no_group_are_skipped(monkeypatch):
    flat = make_flat()
    frozen = {n: flat[n].copy() for n in ("w2", "b2")}
    opt = fo.Adam([{"params": flat.select("w1", "b1")}, {"params": flat.select("s", "w3")}], lr=0.1)
    calls = count_launches(monkeypatch)
    grads = random_grads(flat, np.random.default_rng(5))
    grads["w2"][...] = np.nan  # never read
    before = flat.copy()
    opt.step(grads)
    for n, v in frozen.items():
        np.testing.assert_array_equal(flat[n], v)
    assert sorted(opt.state) == ["b1", "s", "w1", "w3"]
    assert np.all(np.isfinite(flat.buffer))
    for n in ("w1", "b1", "s", "w3"):
        assert np.all(flat[n] != before[n])
    # w1, b1 are one run; w2, b2 are skipped; s, w3 are another run
    assert len(calls) == 2 and sum(size for _, size in calls) < flat.layout.size


def test_mixed_variants_split_into_runs_and_stay_correct(monkeypatch):
    flat = make_flat()
    arrays = {n: flat[n].copy() for n in flat}
    groups = [("w1", "b1"), ("w2", "b2", "s"), ("e", "w3")]
    amsgrad = [True, False, True]
    opt = fo.Adam([{"params": flat.select(*g), "amsgrad": a} for g, a in zip(groups, amsgrad)], lr=0.1)
    ref = fo.Adam([{"params": [arrays[n] for n in g], "amsgrad": a} for g, a in zip(groups, amsgrad)], lr=0.1)
    calls = count_launches(monkeypatch)
    rng = np.random.default_rng(6)
    grads = random_grads(flat, rng)
    opt.step(grads)
    ref.step([grads[n].copy() for g in groups for n in g])
    assert [c[0] for c in calls[:3]] == ["adam_amsgrad", "adam", "adam_amsgrad"]
    for n in flat:
        np.testing.assert_allclose(flat[n], arrays[n], rtol=2e-6, err_msg=n)


def test_hyper_parameters_edited_between_steps_and_schedules(monkeypatch):
    flat = make_flat()
    arrays = {n: flat[n].copy() for n in flat}
    schedule = lambda step: 0.1 / (1 + step)
    opt = fo.SGD([{"params": flat.select("w*"), "lr": schedule}, {"params": flat.select("b*", "s", "e")}], lr=0.1)
    ref = fo.SGD([{"params": [arrays[n] for n in WEIGHTS], "lr": schedule},
                  {"params": [arrays[n] for n in BIASES]}], lr=0.1)
    rng = np.random.default_rng(7)
    for step in range(4):
        if step == 2:
            for o in (opt, ref):
                o.param_groups[1]["lr"] = 0.5
                o.param_groups[1]["momentum"] = 0.9  # switches a variant and a state buffer on
        grads = random_grads(flat, rng)
        opt.step(grads)
        ref.step([grads[n].copy() for n in WEIGHTS + BIASES])
    for n in flat:
        np.testing.assert_allclose(flat[n], arrays[n], rtol=2e-6, err_msg=n)
    assert "momentum_buffer" in opt.state["b1"] and "momentum_buffer" not in opt.state["w1"]
    assert opt.step_count == 4


def test_a_whole_flatparams_and_a_raw_gradient_buffer():
    flat = make_flat(np.float64)
    other = flat.copy()
    opt = fo.Adam(flat, lr=0.1)
    ref = fo.Adam([{"params": other}], lr=0.1)
    assert opt.param_groups[0]["params"].names == flat.names
    grads = random_grads(flat, np.random.default_rng(8))
    opt.step(grads)
    ref.step(grads.buffer.copy())
    np.testing.assert_array_equal(flat.buffer, other.buffer)


def test_bad_gradients_are_rejected_before_anything_changes():
    flat = make_flat()
    opt = fo.Adam(flat, lr=0.1)
    before = flat.buffer.copy()
    other_layout = fo.FlatParams({"w1": (6, 5)})
    bad = [
        (other_layout, ValueError, "different layout"),
        (np.zeros(flat.layout.size, np.float64), TypeError, "dtype"),
        (np.zeros(flat.layout.size + 1, np.float32), ValueError, "shape"),
        (np.zeros((flat.layout.size, 2), np.float32)[:, 0], ValueError, "C-contiguous"),
        (flat, ValueError, "shares memory with the parameters"),
        (flat.buffer, ValueError, "shares memory with the parameters"),
        (opt._flat.buffers["exp_avg"], ValueError, "shares memory with the optimizer's exp_avg"),
        ([flat[n] for n in flat], TypeError, "FlatParams with the same layout"),
        (None, TypeError, "FlatParams with the same layout"),
    ]
    for grads, exc, match in bad:
        with pytest.raises(exc, match=match):
            opt.step(grads)
    np.testing.assert_array_equal(flat.buffer, before)
    assert opt.step_count == 0 and opt.state["w1"]["step"] == 0


def test_bad_param_structures_are_clear_errors():
    flat, other = make_flat(), make_flat()
    with pytest.raises(ValueError, match="different FlatParams"):
        fo.Adam([{"params": flat.select("w*")}, {"params": other.select("b*")}])
    with pytest.raises(ValueError, match="'w1' is in param groups 0 and 1"):
        fo.Adam([{"params": flat.select("w*")}, {"params": flat.select("w1", "b1")}])
    with pytest.raises(TypeError, match="must be a FlatParams or a selection"):
        fo.Adam([{"params": flat.select("w*")}, {"params": [np.zeros(3, np.float32)]}])
    with pytest.raises(TypeError, match="as param group dicts"):
        fo.Adam([flat.select("w*"), flat.select("b*")])
    with pytest.raises(TypeError, match="unknown option"):
        fo.Adam([{"params": flat.select("w*"), "momentum": 0.9}])
    with pytest.raises(ValueError, match="Invalid beta"):
        fo.Adam([{"params": flat.select("w*"), "betas": (1.5, 0.9)}])
    with pytest.raises(ValueError, match="empty parameter list"):
        fo.Adam(fo.FlatParams({}))


def test_state_is_keyed_by_name_and_views_the_flat_buffers():
    flat = make_flat()
    opt = fo.Adagrad([{"params": flat.select("w*"), "initial_accumulator_value": 0.25},
                      {"params": flat.select("b*")}], lr=0.1)
    state = opt.state
    assert sorted(state) == ["b1", "b2", "w1", "w2", "w3"]
    assert np.all(state["w1"]["sum"] == 0.25) and np.all(state["b1"]["sum"] == 0.0)
    assert state["w1"]["sum"].shape == (6, 5)
    assert np.shares_memory(state["w1"]["sum"], opt._flat.buffers["sum"])
    opt.step(random_grads(flat, np.random.default_rng(9)))
    assert state["w1"]["sum"].min() > 0.25  # live views
    flat_state = opt._flat.flat_state()["sum"]
    assert flat_state.layout is flat.layout and flat_state["w1"] is not None
    np.testing.assert_array_equal(flat_state["w1"], state["w1"]["sum"])


def test_state_dict_round_trip_continues_identically():
    flat = make_flat()
    opt = fo.NAdam([{"params": flat.select("w*"), "weight_decay": 0.1}, {"params": flat.select("b*")}], lr=0.01)
    rng = np.random.default_rng(10)
    for _ in range(3):
        opt.step(random_grads(flat, rng))
    sd = opt.state_dict()
    assert sd["param_groups"][0]["params"] == ["w1", "w2", "w3"]
    assert set(sd["state"]) == {"w1", "w2", "w3", "b1", "b2"}
    assert sd["state"]["w1"]["step"] == 3 and 0 < sd["state"]["w1"]["mu_product"] < 1
    assert not np.shares_memory(sd["state"]["w1"]["exp_avg"], opt._flat.buffers["exp_avg"])
    saved = flat.copy()
    later = [random_grads(flat, rng) for _ in range(2)]
    for g in later:
        opt.step(g)
    twin = saved.copy()
    opt2 = fo.NAdam([{"params": twin.select("w*")}, {"params": twin.select("b*")}], lr=0.5)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["weight_decay"] == 0.1 and opt2.param_groups[1]["lr"] == 0.01
    for g in later:
        opt2.step(g)
    np.testing.assert_array_equal(twin.buffer, flat.buffer)


def test_load_state_dict_with_uneven_steps_from_the_list_path():
    """Tensors that missed steps (None gradients) keep their own step counts in the flat engine."""
    flat = make_flat()
    arrays = {n: flat[n].copy() for n in flat}
    names = list(flat)
    ref = fo.Adam([arrays[n] for n in names], lr=0.1)
    rng = np.random.default_rng(11)
    for k in range(3):
        g = random_grads(flat, rng)
        ref.step([None if (k < 2 and n in ("w2", "b1")) else g[n].copy() for n in names])
    sd = ref.state_dict()
    sd["param_groups"][0]["params"] = names
    sd["state"] = {names[i]: entry for i, entry in sd["state"].items()}
    np.copyto(flat.buffer, fo.FlatParams.from_arrays(arrays).buffer)
    opt = fo.Adam(flat, lr=0.3)
    opt.load_state_dict(sd)
    assert opt.state["w2"]["step"] == 1 and opt.state["w1"]["step"] == 3
    assert len(opt._flat.cohorts) == 2
    for _ in range(2):
        g = random_grads(flat, rng)
        opt.step(g)
        ref.step([g[n].copy() for n in names])
    for n in names:
        np.testing.assert_allclose(flat[n], arrays[n], rtol=2e-6, err_msg=n)


def test_a_bad_state_dict_changes_nothing():
    flat = make_flat()
    opt = fo.Adam([{"params": flat.select("w*")}, {"params": flat.select("b*")}], lr=0.1)
    opt.step(random_grads(flat, np.random.default_rng(12)))
    good = opt.state_dict()
    before = {n: {k: np.copy(v) for k, v in e.items()} for n, e in opt.state.items()}

    def edited(fn):
        sd = opt.state_dict()
        fn(sd)
        return sd

    bad = [
        (edited(lambda sd: sd["param_groups"][0].__setitem__("params", ["w1", "w3", "w2"])), ValueError, "holds"),
        (edited(lambda sd: sd["state"].__setitem__("bx", sd["state"].pop("b2"))), ValueError,
         "no state for parameter b2"),
        (edited(lambda sd: sd["state"].pop("b2")), ValueError, "state for 4 parameters"),
        (edited(lambda sd: sd["state"]["w1"].__setitem__("exp_avg", np.zeros(3, np.float32))), ValueError, "shape"),
        (edited(lambda sd: sd["state"]["w1"].pop("exp_avg_sq")), ValueError, "has state"),
        (edited(lambda sd: sd.__setitem__("optimizer", "SGD")), ValueError, "from optimizer 'SGD'"),
        (edited(lambda sd: sd["param_groups"][1].__setitem__("lr", -1.0)), ValueError, "Invalid learning rate"),
    ]
    for sd, exc, match in bad:
        with pytest.raises(exc, match=match):
            opt.load_state_dict(sd)
        for n, e in opt.state.items():
            for k, v in e.items():
                np.testing.assert_array_equal(v, before[n][k])
    assert opt.param_groups[1]["lr"] == 0.1
    opt.load_state_dict(good)


# -- gradient transforms (fastopt.transforms) over a FlatParams ----------------------------

def test_clip_grad_norm_matches_the_list_path_and_ignores_padding():
    flat = make_flat()
    arrays = {n: flat[n].copy() for n in flat}
    opt = fo.Adam([{"params": flat.select(*WEIGHTS), "weight_decay": 0.1}, {"params": flat.select(*BIASES)}],
                  lr=0.1, clip_grad_norm=0.5)
    ref = fo.Adam([{"params": [arrays[n] for n in WEIGHTS], "weight_decay": 0.1},
                   {"params": [arrays[n] for n in BIASES]}], lr=0.1, clip_grad_norm=0.5)
    rng = np.random.default_rng(20)
    pad = flat.layout.padding_mask()
    for _ in range(3):
        grads = random_grads(flat, rng)
        raw = grads.buffer.copy()
        raw[pad] = 1e3  # finite garbage in the padding: not part of the norm
        opt.step(raw)
        ref.step([grads[n].copy() for n in WEIGHTS + BIASES])
        want = np.sqrt(sum(float(np.sum(grads[n].astype(np.float64) ** 2)) for n in flat))
        assert opt.last_grad_norm == pytest.approx(want, rel=1e-12)
        assert opt.last_grad_norm == pytest.approx(ref.last_grad_norm, rel=1e-12)
    for n in flat:
        np.testing.assert_allclose(flat[n], arrays[n], rtol=2e-6, atol=1e-7, err_msg=n)


def test_skip_nonfinite_skips_the_whole_step():
    flat = make_flat()
    opt = fo.Adam([{"params": flat.select(*WEIGHTS)}, {"params": flat.select(*BIASES)}], lr=0.1,
                  skip_nonfinite=True)
    rng = np.random.default_rng(21)
    opt.step(random_grads(flat, rng))
    before = flat.copy()
    state = {n: {k: np.copy(v) for k, v in e.items()} for n, e in opt.state.items()}
    grads = random_grads(flat, rng)
    grads["b2"][1] = np.inf
    opt.step(grads)
    assert opt.last_step_skipped and opt.skipped_steps == 1 and opt.step_count == 1
    np.testing.assert_array_equal(flat.buffer, before.buffer)
    for n, e in opt.state.items():
        for k, v in e.items():
            np.testing.assert_array_equal(v, state[n][k])
    grads["b2"][1] = 0.0
    opt.step(grads)
    assert not opt.last_step_skipped and opt.step_count == 2


def test_nonfinite_padding_in_a_raw_gradient_is_an_error():
    flat = make_flat()
    opt = fo.Adam(flat, lr=0.1, skip_nonfinite=True)
    raw = random_grads(flat, np.random.default_rng(22)).buffer.copy()
    raw[np.flatnonzero(flat.layout.padding_mask())[0]] = np.nan
    before = flat.buffer.copy()
    with pytest.raises(ValueError, match="NaN or inf in the padding"):
        opt.step(raw)
    np.testing.assert_array_equal(flat.buffer, before)
    assert opt.step_count == 0 and opt.skipped_steps == 0


@pytest.mark.parametrize("maximize", [False, True])
def test_grad_noise_is_the_noise_of_the_same_buffer_as_one_array(maximize):
    """Element j of the noise stream is buffer position j: a FlatParams and one plain array over
    a copy of its buffer, with the same seed, get the same noise on every tensor element."""
    flat = make_flat()
    whole = flat.buffer.copy()
    opt = fo.Adam(flat, lr=0.1, grad_noise=(0.3, 0.55), seed=7, maximize=maximize)
    ref = fo.Adam([whole], lr=0.1, grad_noise=(0.3, 0.55), seed=7, maximize=maximize)
    pad = flat.layout.padding_mask()
    rng = np.random.default_rng(23)
    for _ in range(3):
        grads = random_grads(flat, rng)
        opt.step(grads)
        ref.step(grads.buffer.copy())
    np.testing.assert_array_equal(flat.buffer[~pad], whole[~pad])
    assert np.all(flat.buffer[pad] == 0)  # the padding rows draw no noise
    for key, buf in opt._flat.buffers.items():
        np.testing.assert_array_equal(buf[~pad], ref.state[0][key][~pad])
        assert np.all(buf[pad] == 0), key  # no noise reached the padding's state either
