"""No input makes a kernel read or write outside the arrays it was given.

Every host array a kernel gets is a base-class 1-D ``np.ndarray`` of exactly the parameter's
size (``fastopt._validation.flat_view``); ``np.memmap`` is read through such a view, every
other ndarray subclass is a TypeError, and layouts are checked when made.

The main table is hostile arrays x entry points. Each hostile array lives inside a larger
guard buffer filled with a sentinel; a case passes when the call raises the expected error
and the guard buffer (the array and the memory around it) is bit for bit as before. Those
cases run in a worker subprocess (``python tests/test_memory_safety.py``, with a timeout): a
kernel that writes past a buffer can crash the interpreter, and a crash must fail the cases,
not the test run. The worker prints one line per case; after a crash the rest run in a new
worker.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import fastopt as fo
from fastopt import kernels
from fastopt.flat import FlatLayout, FlatParams

sys.path.insert(0, os.path.dirname(__file__))
from registry import CASES  # noqa: E402

N = 12  # elements of a hostile array: an old 2-D kernel loop wrote up to N * N of them
PAD = 2 * N * N  # guard elements on each side, so such writes land in the guard
SENTINEL = -7.25
pytestmark = pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
RULE_OPTIONS = {"sgd": {"momentum": 0.9}}  # options under which every rule has a state buffer


class Subclass(np.ndarray):
    """A user's ndarray subclass that changes nothing."""


# kind -> (make from a 1-D base view, expected exception, message regex)
HOSTILE = {
    "matrix-row": (lambda b: np.matrix(b.reshape(1, -1), copy=False), TypeError, "numpy.matrix"),
    "matrix-column": (lambda b: np.matrix(b.reshape(-1, 1), copy=False), TypeError, "numpy.matrix"),
    "masked": (lambda b: np.ma.masked_array(b, mask=np.zeros(b.shape, bool)), TypeError, "masked array"),
    "user-subclass": (lambda b: b.view(Subclass), TypeError, "Subclass, a NumPy array subclass"),
    "recarray": (lambda b: b.view(np.recarray), TypeError, "recarray, a NumPy array subclass"),
    "negative-strides": (lambda b: b[::-1], ValueError, "C-contiguous"),
    "int-view": (lambda b: b.view(np.int64 if b.dtype.itemsize == 8 else np.int32), TypeError, "dtype"),
    "byte-swapped": (lambda b: b.view(b.dtype.newbyteorder()), TypeError, "dtype"),
}
SUBCLASSES = [k for k in HOSTILE if k not in ("negative-strides", "int-view", "byte-swapped")]


class Guard:
    """``N`` (or ``n``) elements inside a buffer of sentinels; ``intact()``: nothing changed."""

    def __init__(self, dtype, n=N, values=None):
        self.buf = np.full(n + 2 * PAD, SENTINEL, dtype)
        self.inner = self.buf[PAD:PAD + n]
        self.inner[:] = np.linspace(0.5, 1.5, n) if values is None else values
        self.before = self.buf.copy()

    def intact(self) -> bool:
        return self.buf.tobytes() == self.before.tobytes()


def hostile(kind, dtype, guards, n=N, values=None):
    g = Guard(dtype, n, values)
    guards.append(g)
    return HOSTILE[kind][0](g.inner)


def plain_like(a, dtype, guards, values=None):
    """A plain array of ``a``'s shape inside a guard."""
    g = Guard(dtype, a.size, values)
    guards.append(g)
    return g.inner.reshape(a.shape)


def _snapshot(opt):
    return [{k: np.array(v, copy=True) for k, v in s.items() if isinstance(v, np.ndarray)} for s in opt.state]


def _same(a, b):
    return all(a_.keys() == b_.keys() and all(np.array_equal(a_[k], b_[k]) for k in a_) for a_, b_ in zip(a, b))


# -- entry points: each does its call with hostile arrays, returning whether non-guard state held --
def opt_param(case, kind, guards):
    p = hostile(kind, np.float64, guards)
    opt = case.make([p])
    opt.step([np.ones(p.shape)])  # only reached if construction accepted p


def opt_grad(case, kind, guards):
    shape_of = hostile(kind, np.float64, [])
    p = plain_like(np.empty(shape_of.shape), np.float64, guards)
    opt = case.make([p])
    before = _snapshot(opt)
    g = hostile(kind, np.float64, guards)
    try:
        opt.step([g])
    finally:
        assert _same(before, _snapshot(opt)), "the optimizer's state changed"


def kernel_param(rule, dtype, kind, guards):
    p = hostile(kind, dtype, guards)
    state = kernels.init_state(rule, np.zeros(p.shape, dtype), **RULE_OPTIONS.get(rule, {}))
    getattr(kernels, f"{rule}_step")(p, np.ones(p.shape, dtype), state, step=1, **RULE_OPTIONS.get(rule, {}))


def kernel_grad(rule, dtype, kind, guards):
    g = hostile(kind, dtype, guards)
    p = plain_like(np.empty(g.shape), dtype, guards)
    state = kernels.init_state(rule, p, **RULE_OPTIONS.get(rule, {}))
    getattr(kernels, f"{rule}_step")(p, g, state, step=1, **RULE_OPTIONS.get(rule, {}))


def kernel_state(rule, dtype, kind, guards):
    shape = hostile(kind, dtype, []).shape
    p = plain_like(np.empty(shape), dtype, guards)
    opts = RULE_OPTIONS.get(rule, {})
    state = kernels.init_state(rule, np.zeros(shape, dtype), **opts)
    for name in [k for k in state if k != "host"]:
        state[name] = hostile(kind, dtype, guards, values=np.ravel(state[name]))
    getattr(kernels, f"{rule}_step")(p, np.ones(shape, dtype), state, step=1, **opts)


def init_state(rule, kind, guards):
    p = hostile(kind, np.float64, guards)
    state = kernels.init_state(rule, p, **RULE_OPTIONS.get(rule, {}))
    bad = {k: type(v).__name__ for k, v in state.items() if k != "host" and type(v) is not np.ndarray}
    raise AssertionError(f"init_state accepted a {type(p).__name__} and gave {bad or 'plain arrays'}")


def _flat_model():
    return FlatParams({"w": (3, 2), "b": 5})  # padding after both tensors


def flat_buffer(kind, guards):
    layout = _flat_model().layout
    buf = hostile(kind, np.float32, guards, n=layout.size)
    flat = FlatParams.from_layout(layout, buf)
    fo.Adam(flat, lr=0.1).step(flat.zeros_like())


def flat_grad(kind, guards):
    flat = _flat_model()
    opt = fo.Adam(flat, lr=0.1)
    before = flat.buffer.copy()
    g = hostile(kind, np.float32, guards, n=flat.layout.size, values=0.0)
    try:
        opt.step(g)
    finally:
        assert np.array_equal(before, flat.buffer), "the parameters changed"


def grad_norm(kind, guards):
    fo.transforms.grad_norm([hostile(kind, np.float64, guards)])


def clip_grad_norm(kind, guards):
    fo.transforms.clip_grad_norm_([hostile(kind, np.float64, guards)], 0.1)


def early_stopping(kind, guards):
    stopper = fo.EarlyStopping(patience=0, params=[hostile(kind, np.float64, guards)], restore_best=True)
    stopper.update(1.0)
    stopper.update(2.0)


def load_state_dict(case, kind, guards):
    shape = hostile(kind, np.float64, []).shape
    p = np.ones(shape)
    opt = case.make([p])
    opt.step([np.ones(shape)])
    sd = opt.state_dict()
    for name in [k for k, v in sd["state"][0].items() if isinstance(v, np.ndarray)]:
        sd["state"][0][name] = hostile(kind, np.float64, guards, values=np.ravel(sd["state"][0][name]))
    before = _snapshot(opt)
    try:
        opt.load_state_dict(sd)
    finally:
        assert _same(before, _snapshot(opt)), "the optimizer's state changed"


def _cases() -> dict:
    cases = {}
    buffered = [c for c in CASES if c.id in ("sgd-momentum", "adam-amsgrad", "nadam", "rmsprop-centered-momentum")]
    for kind in HOSTILE:
        for c in CASES:
            cases[f"optimizer-param-{c.id}-{kind}"] = (opt_param, c, kind)
            cases[f"optimizer-grad-{c.id}-{kind}"] = (opt_grad, c, kind)
        for rule in kernels.RULES:
            for dtype in (np.float32, np.float64):
                d = np.dtype(dtype).name
                cases[f"kernel-param-{rule}-{d}-{kind}"] = (kernel_param, rule, dtype, kind)
                cases[f"kernel-grad-{rule}-{d}-{kind}"] = (kernel_grad, rule, dtype, kind)
                cases[f"kernel-state-{rule}-{d}-{kind}"] = (kernel_state, rule, dtype, kind)
        cases[f"flat-buffer-{kind}"] = (flat_buffer, kind)
        cases[f"flat-grad-{kind}"] = (flat_grad, kind)
        if kind in SUBCLASSES:  # the others are valid input for these (they copy or read)
            for rule in kernels.RULES:
                cases[f"init-state-{rule}-{kind}"] = (init_state, rule, kind)
            cases[f"grad-norm-{kind}"] = (grad_norm, kind)
            cases[f"clip-grad-norm-{kind}"] = (clip_grad_norm, kind)
            cases[f"early-stopping-{kind}"] = (early_stopping, kind)
            for c in buffered:
                cases[f"load-state-dict-{c.id}-{kind}"] = (load_state_dict, c, kind)
    return cases


HOSTILE_CASES = _cases()


def run_case(case_id: str) -> dict:
    fn, *args = HOSTILE_CASES[case_id]
    guards: list[Guard] = []
    error, message = None, ""
    try:
        fn(*args, guards)
    except AssertionError as exc:
        error, message = "AssertionError", str(exc)
    except Exception as exc:  # noqa: BLE001 - the worker reports whatever happened
        error, message = type(exc).__name__, str(exc)
    return {"error": error, "message": message[:300], "intact": all(g.intact() for g in guards)}


def _worker() -> None:
    for line in sys.stdin:
        case_id = line.strip()
        print(f"START {case_id}", flush=True)
        print("RESULT " + json.dumps({"id": case_id, **run_case(case_id)}), flush=True)


@pytest.fixture(scope="module")
def hostile_results():
    results: dict[str, dict] = {}
    pending = list(HOSTILE_CASES)
    for _ in range(20):  # workers; a crash ends one, the next starts after the crashed case
        if not pending:
            break
        proc = subprocess.run([sys.executable, __file__], input="\n".join(pending) + "\n", capture_output=True,
                              text=True, timeout=300, env={**os.environ, "PYTHONFAULTHANDLER": "0"})
        started = None
        for line in proc.stdout.splitlines():
            if line.startswith("START "):
                started = line[6:]
            elif line.startswith("RESULT "):
                r = json.loads(line[7:])
                results[r.pop("id")] = r
                started = None
        if started is not None:
            results[started] = {"error": f"worker crashed (exit {proc.returncode})",
                                "message": proc.stderr[-500:], "intact": False}
        pending = [c for c in pending if c not in results]
    return results


@pytest.mark.parametrize("case_id", list(HOSTILE_CASES))
def test_hostile_array_raises_and_nothing_outside_changes(hostile_results, case_id):
    assert case_id in hostile_results, "the case never ran (workers kept crashing)"
    r = hostile_results[case_id]
    kind = next(k for k in HOSTILE if case_id.endswith(k))
    _, exc, regex = HOSTILE[kind]
    assert r["error"] == exc.__name__, f"expected {exc.__name__}, got {r['error']}: {r['message']}"
    assert __import__("re").search(regex, r["message"]), r["message"]
    assert r["intact"], "memory in or around the arrays changed"


# -- arrays that are unusual but valid update exactly like plain ones ----------------------
ODD_ARRAYS = {  # valid arrays of unusual shapes and strides
    "zero-d": lambda: np.array(0.5),
    "zero-size-dim": lambda: np.ones((0, 3)),
    "size-one-negative-stride": lambda: (np.arange(3.0)[::-1] + 0.5)[:1],
    "two-d": lambda: np.linspace(0.1, 1.0, 12).reshape(3, 4),
    "unaligned": lambda: _unaligned(np.linspace(0.1, 1.0, 12)),
}


def _unaligned(values):
    a = np.zeros(values.nbytes + 1, np.uint8)[1:].view(values.dtype)
    assert not a.flags.aligned
    a[:] = values
    return a


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 4)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_memmap_parameters_update_like_plain_ones(tmp_path, case, shape):
    values = np.linspace(0.1, 1.0, math.prod(shape)).reshape(shape)
    grad = np.cos(values) + 0.25
    m = np.memmap(tmp_path / "p.bin", dtype=np.float64, mode="w+", shape=shape)
    m[...] = values
    gm = np.memmap(tmp_path / "g.bin", dtype=np.float64, mode="w+", shape=shape)
    gm[...] = grad
    plain = values.copy()
    opt, ref = case.make([m]), case.make([plain])
    for _ in range(3):
        opt.step([gm])
        ref.step([grad])
    np.testing.assert_array_equal(np.asarray(m), plain)
    assert opt.param_groups[0]["params"][0] is m
    assert all(type(v) is np.ndarray for s in opt.state for v in s.values() if isinstance(v, np.ndarray))


@pytest.mark.parametrize("name", list(ODD_ARRAYS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_odd_shaped_parameters_update_like_flat_ones(case, name):
    p = ODD_ARRAYS[name]()
    flat = np.array(p).reshape(-1)
    grad = np.asarray(np.cos(np.array(p)) + 0.25)
    opt, ref = case.make([p]), case.make([flat])
    for _ in range(3):
        opt.step([grad])
        ref.step([grad.reshape(-1)])
    np.testing.assert_array_equal(np.array(p).reshape(-1), flat)


@pytest.mark.parametrize("name", list(ODD_ARRAYS))
@pytest.mark.parametrize("rule", list(kernels.RULES))
def test_odd_shaped_arrays_in_kernels_update_like_flat_ones(rule, name):
    opts = RULE_OPTIONS.get(rule, {})
    p = ODD_ARRAYS[name]()
    flat = np.array(p).reshape(-1)
    grad = np.asarray(np.cos(np.array(p)) + 0.25)
    sp, sf = kernels.init_state(rule, p, **opts), kernels.init_state(rule, flat, **opts)
    for step in (1, 2):
        kernels.update(rule, p, grad, sp, step=step, **opts)
        kernels.update(rule, flat, grad.reshape(-1), sf, step=step, **opts)
    np.testing.assert_array_equal(np.array(p).reshape(-1), flat)


@pytest.mark.parametrize("rule", list(kernels.RULES))
def test_kernels_take_memmaps_and_give_plain_state(tmp_path, rule):
    opts = RULE_OPTIONS.get(rule, {})
    m = np.memmap(tmp_path / "p.bin", dtype=np.float32, mode="w+", shape=(5, 3))
    m[...] = np.linspace(0.1, 1.0, 15).reshape(5, 3)
    plain = np.array(m)
    sm, sp = kernels.init_state(rule, m, **opts), kernels.init_state(rule, plain, **opts)
    assert all(type(v) is np.ndarray for k, v in sm.items() if k != "host")
    for step in (1, 2):
        kernels.update(rule, m, np.full((5, 3), 0.5, np.float32), sm, step=step, **opts)
        kernels.update(rule, plain, np.full((5, 3), 0.5, np.float32), sp, step=step, **opts)
    np.testing.assert_array_equal(np.asarray(m), plain)


def test_flat_buffer_memmap_is_used_in_place(tmp_path):
    layout = _flat_model().layout
    m = np.memmap(tmp_path / "flat.bin", dtype=np.float32, mode="w+", shape=(layout.size,))
    flat = FlatParams.from_layout(layout, m)
    assert type(flat.buffer) is np.ndarray and np.shares_memory(flat.buffer, m)
    g = flat.zeros_like()
    g["w"][...] = 1.0
    fo.SGD(flat, lr=0.5).step(g)
    assert np.all(m[layout.span("w")] == -0.5) and np.count_nonzero(m) == 6


def test_early_stopping_snapshots_a_memmap_as_a_plain_array(tmp_path):
    m = np.memmap(tmp_path / "p.bin", dtype=np.float64, mode="w+", shape=(4,))
    stopper = fo.EarlyStopping(patience=1, params=m, restore_best=True)
    stopper.update(1.0)
    assert type(stopper.best_params[0]) is np.ndarray


def test_early_stopping_restores_all_or_nothing():
    a, b = np.zeros(3), np.zeros(3)
    stopper = fo.EarlyStopping(patience=1, params=[a, b])
    stopper.update(1.0)
    a[...] = b[...] = 5.0
    b.flags.writeable = False
    with pytest.raises(ValueError, match=r"params\[1\] is read-only"):
        stopper.restore()
    assert np.all(a == 5.0)
    with pytest.raises(ValueError, match="read-only"):
        fo.EarlyStopping(params=[b], restore_best=True)


def test_host_subclasses_are_not_device_arrays():
    from fastopt._backend import is_device_array

    class Exporting(np.ndarray):  # a host subclass that claims the CUDA interface
        __cuda_array_interface__ = {"shape": (3,), "typestr": "<f8", "data": (0, False), "version": 3}

    base = np.zeros(3)
    for a in (np.matrix(base), np.ma.masked_array(base), base.view(Subclass), base.view(Exporting)):
        assert not is_device_array(a)
    with pytest.raises(TypeError, match="subclass"):
        fo.SGD([base.view(Exporting)])
    with pytest.raises(TypeError, match="subclass"):
        FlatParams.from_layout(FlatLayout.build({"w": 3}), np.zeros(16, np.float32).view(Exporting))


def test_torch_state_dict_of_masked_arrays_is_rejected():
    pytest.importorskip("torch")
    from fastopt.torch_compat import from_torch_state_dict

    p = np.zeros(4)
    opt = fo.Adam([p], lr=0.1)
    opt.step([np.ones(4)])
    before = _snapshot(opt)
    sd = {"state": {0: {"step": 1.0, "exp_avg": np.ma.masked_array(np.ones(4), mask=[1, 0, 0, 0]),
                        "exp_avg_sq": np.ones(4)}},
          "param_groups": [{"params": [0], "lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                            "amsgrad": False, "maximize": False}]}
    with pytest.raises(TypeError, match="masked array"):
        from_torch_state_dict(opt, sd)
    assert _same(before, _snapshot(opt))


# -- layouts: a hand-built FlatLayout is checked like a built one ------------------------------
def _layout(**change):
    fields = {"names": ("w", "b"), "shapes": ((3, 2), (5,)), "offsets": (0, 16), "size": 32,
              "dtype": np.dtype(np.float32), "align": 64}
    return FlatLayout(**{**fields, **change})


BAD_LAYOUTS = [
    # (id, fields changed, exception, message regex)
    ("out-of-order", {"names": ("b", "w"), "shapes": ((5,), (3, 2)), "offsets": (16, 0)}, ValueError,
     "buffer order"),
    ("overlapping", {"shapes": ((4, 5), (5,))}, ValueError, "overlaps"),
    ("same-offset", {"offsets": (0, 0)}, ValueError, "overlaps"),
    ("past-the-end", {"offsets": (0, 32)}, ValueError, "past the buffer"),
    ("size-too-small", {"size": 20}, ValueError, "past the buffer"),
    ("negative-offset", {"offsets": (-16, 16)}, ValueError, "must be >= 0"),
    ("float-offset", {"offsets": (0, 16.0)}, TypeError, "must be an int"),
    ("bool-size", {"size": True}, TypeError, "must be an int"),
    ("misaligned", {"offsets": (0, 8)}, ValueError, "not a multiple of 16"),
    ("int-dtype", {"dtype": np.dtype(np.int32)}, TypeError, "float32 or float64"),
    ("bool-dtype", {"dtype": np.dtype(bool)}, TypeError, "float32 or float64"),
    ("float16-dtype", {"dtype": np.dtype(np.float16)}, TypeError, "float32 or float64"),
    ("bad-align", {"align": 48}, ValueError, "power of two"),
    ("duplicate-names", {"names": ("w", "w")}, ValueError, "duplicate"),
    ("empty-name", {"names": ("w", "")}, TypeError, "non-empty strings"),
    ("missing-shape", {"shapes": ((3, 2),)}, ValueError, "one shape and one offset per name"),
    ("missing-offset", {"offsets": (0,)}, ValueError, "one shape and one offset per name"),
    ("negative-dim", {"shapes": ((3, -2), (5,))}, ValueError, "integers >= 0"),
    ("shape-not-ints", {"shapes": ((3, 2.5), (5,))}, ValueError, "integers >= 0"),
    ("names-a-string", {"names": "wb"}, TypeError, "must be a sequence"),
]


@pytest.mark.parametrize("change, exc, regex", [c[1:] for c in BAD_LAYOUTS], ids=[c[0] for c in BAD_LAYOUTS])
def test_bad_layouts_are_rejected_when_made(change, exc, regex):
    with pytest.raises(exc, match=regex):
        _layout(**change)


def test_a_hand_built_layout_is_normalised_and_equals_the_built_one():
    built = FlatLayout.build({"w": (3, 2), "b": 5})
    by_hand = _layout(shapes=[[3, 2], 5], offsets=[np.int64(0), 16], dtype="float32", size=np.int32(32))
    assert by_hand == built and hash(by_hand) == hash(built)
    assert by_hand.shapes == ((3, 2), (5,)) and type(by_hand.size) is int


@pytest.mark.parametrize("extra", [{}, {"grad_noise": (0.1, 0.55), "seed": 3}])
@pytest.mark.parametrize("case", [c for c in CASES if "eps" in c.hyper()], ids=lambda c: c.id)
def test_padding_before_the_first_tensor_never_changes(case, extra):
    """A hand-built layout may start with padding; it is a padding row like the others:
    unchanged, never NaN even with eps=0 and noise (it was updated as part of the first tensor)."""
    layout = _layout(offsets=(16, 32), size=48)
    flat = FlatParams.from_layout(layout)
    flat.buffer[:] = 0.0
    flat["w"][...] = 0.5
    opt = case.cls(flat, **{**case.options, "eps": 0.0}, **extra)
    g = flat.zeros_like()
    g["w"][...] = 1.0
    g["b"][...] = 1.0
    for _ in range(3):
        opt.step(g)
    assert np.all(flat.buffer[layout.padding_mask()] == 0.0)
    g.buffer[3] = np.inf  # the leading padding is checked like the rest
    with pytest.raises(ValueError, match="padding"):
        opt.step(g)


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_host_gradient_buffer_of_sharded_and_flat_optimizers_rejects_hostile_arrays(kind):
    from fastopt.flat import host_gradient_buffer

    flat = _flat_model()
    g = HOSTILE[kind][0](np.zeros(flat.layout.size, np.float32))
    _, exc, regex = HOSTILE[kind]
    with pytest.raises(exc, match=regex):
        host_gradient_buffer(g, flat.layout, flat.buffer)


# -- kernels.*_step: grad_scale, host state and every per-step scalar ----------------------
def _kernel_call(rule="adam", dtype=np.float32, **kw):
    opts = RULE_OPTIONS.get(rule, {})
    p = np.linspace(0.1, 1.0, 8).astype(dtype)
    g = np.full(8, 0.5, dtype)
    state = kernels.init_state(rule, p, **opts)
    kernels.update(rule, p, g, state, step=1, **opts)  # a state that has moved
    before = {k: (dict(v) if k == "host" else v.copy()) for k, v in state.items()}, p.copy()
    return p, g, state, before, opts


def _unchanged(p, state, before):
    bstate, bp = before
    assert np.array_equal(p, bp)
    for k, v in state.items():
        assert (v == bstate[k]) if k == "host" else np.array_equal(v, bstate[k]), k


BAD_GRAD_SCALES = [(float("nan"), ValueError), (float("inf"), ValueError), (-float("inf"), ValueError),
                   (-1.0, ValueError), (None, TypeError), ("1", TypeError), (True, TypeError),
                   (np.array([1.0]), TypeError), (1e300, ValueError)]  # 1e300 overflows float32


@pytest.mark.parametrize("value, exc", BAD_GRAD_SCALES, ids=[repr(v[0]) for v in BAD_GRAD_SCALES])
@pytest.mark.parametrize("rule", list(kernels.RULES))
def test_bad_grad_scale_raises_before_anything_changes(rule, value, exc):
    p, g, state, before, opts = _kernel_call(rule)
    with pytest.raises(exc, match="grad_scale"):
        kernels.update(rule, p, g, state, step=2, grad_scale=value, **opts)
    _unchanged(p, state, before)


def _mu(step, beta1=0.9, psi=4e-3):
    return beta1 * (1.0 - 0.5 * 0.96 ** (step * psi))


BAD_HOST = [
    # (id, rule, host, exception, message regex)
    ("mu-nan", "nadam", {"mu_product": float("nan")}, ValueError, "finite number"),
    ("mu-inf", "nadam", {"mu_product": float("inf")}, ValueError, "finite number"),
    ("mu-makes-a-denominator-zero", "nadam", {"mu_product": 1.0 / _mu(2)}, ValueError, "mu_product"),
    ("mu-above-one", "nadam", {"mu_product": 2.0}, ValueError, "mu_product"),
    ("mu-negative", "nadam", {"mu_product": -0.5}, ValueError, "mu_product"),
    ("mu-string", "nadam", {"mu_product": "0.5"}, ValueError, "finite number"),
    ("mu-bool", "nadam", {"mu_product": True}, ValueError, "finite number"),
    ("unknown-entry", "adam", {"mu_product": 0.5}, ValueError, "unknown entries"),
    ("host-not-a-dict", "nadam", [("mu_product", 0.5)], TypeError, "must be a dict"),
    ("momentum-started-not-bool", "sgd", {"momentum_started": "yes"}, TypeError, "must be a bool"),
]


@pytest.mark.parametrize("rule, host, exc, regex", [c[1:] for c in BAD_HOST], ids=[c[0] for c in BAD_HOST])
def test_bad_host_state_raises_before_anything_changes(rule, host, exc, regex):
    p, g, state, before, opts = _kernel_call(rule)
    state["host"] = host
    before[0]["host"] = host
    with pytest.raises(exc, match=regex):
        kernels.update(rule, p, g, state, step=2, **opts)
    _unchanged(p, state, before)


def test_a_valid_nadam_host_state_still_works():
    p, g, state, _, opts = _kernel_call("nadam")
    state["host"]["mu_product"] = np.float64(state["host"]["mu_product"])  # NumPy scalars are numbers too
    kernels.update("nadam", p, g, state, step=2)
    assert 0.0 < state["host"]["mu_product"] < 1.0 and np.all(np.isfinite(p))


@pytest.mark.parametrize("rule", list(kernels.RULES))
def test_a_step_whose_scalars_overflow_raises_before_anything_changes(rule):
    """Huge step numbers (OverflowError in the plan) and scalars beyond float32's range are a
    ValueError, for every rule; a rule whose plan stays finite just runs."""
    for step, hyper in ((10**400, {}), (2, {"lr": 1e39})):
        p, g, state, before, opts = _kernel_call(rule)
        try:
            kernels.update(rule, p, g, state, step=step, **{**opts, **hyper})
        except ValueError as exc:
            assert "finite" in str(exc)
            _unchanged(p, state, before)
        else:
            assert np.all(np.isfinite(p)), (step, hyper)


@pytest.mark.parametrize("kind", SUBCLASSES + ["plain"])
@pytest.mark.parametrize("shape", [(), (0, 3), (1, 12), (12, 1), (3, 4)])
def test_flat_view_is_a_base_class_1d_view_of_exactly_size_elements(kind, shape):
    from fastopt._validation import flat_view

    base = np.linspace(0.5, 1.5, math.prod(shape))
    a = base.reshape(shape) if kind == "plain" else HOSTILE[kind][0](base).reshape(shape)
    v = flat_view(a, a.size)
    assert type(v) is np.ndarray and v.shape == (a.size,)
    assert v.size == 0 or np.shares_memory(v, base)
    with pytest.raises(TypeError, match="internal error"):
        flat_view(a, a.size + 1)


@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("align", [64, 128])
def test_every_shard_layout_of_a_sharded_optimizer_is_valid(world, align):
    """ShardedOptimizer builds one FlatLayout per rank (``_shard_layout``); the layout checks
    accept every one (no MPI needed), and each starts with a tensor, not padding."""
    from fastopt.distributed import _shard_layout, shard_bounds

    layout = FlatLayout.build({"a": 3, "b": (5, 7), "e": 0, "c": 40, "d": (2, 2)})
    for lo, hi in shard_bounds(layout.size, world, align // layout.dtype.itemsize):
        shard, starts = _shard_layout(layout, lo, hi)
        assert shard.size == hi - lo
        assert not shard.names or shard.offsets[0] == 0
        assert sum(shard.sizes) == sum(max(0, min(o + n, hi) - max(o, lo))
                                       for o, n in zip(layout.offsets, layout.sizes))


if __name__ == "__main__":
    _worker()
