"""EarlyStopping: the patience rule (Keras'), min_delta, modes, NaN, and the best-parameter
snapshot (one copy per array, restored bitwise)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import fastopt as fo
from fastopt.early_stopping import EarlyStopping


def stop_index(stopper, metrics):
    """The index of the evaluation at which update() first says stop (None: never)."""
    for i, m in enumerate(metrics):
        if stopper.update(m):
            return i
    return None


def reference_stop(metrics, patience, min_delta, mode):
    """Keras' EarlyStopping rule, written out."""
    sign = 1 if mode == "min" else -1
    best, wait = None, 0
    for i, m in enumerate(metrics):
        if not math.isnan(m) and (best is None or sign * m < sign * best - min_delta):
            best, wait = m, 0
            continue
        wait += 1
        if wait >= patience:
            return i
    return None


@pytest.mark.parametrize("patience", [0, 1, 3])
@pytest.mark.parametrize("min_delta", [0.0, 0.05])
@pytest.mark.parametrize("mode", ["min", "max"])
def test_stops_like_the_reference(rng, patience, min_delta, mode):
    for _ in range(20):
        metrics = list(np.round(rng.random(15), 2))
        got = stop_index(EarlyStopping(patience, min_delta, mode), metrics)
        assert got == reference_stop(metrics, patience, min_delta, mode), metrics


def test_improvement_needs_more_than_min_delta():
    s = EarlyStopping(patience=1, min_delta=0.1)
    assert s.update(1.0) is False
    assert s.update(0.95) is True  # 0.05 better is not better enough
    assert s.best == 1.0 and s.best_index == 0


def test_stop_is_sticky_until_reset_and_nan_never_improves():
    s = EarlyStopping(patience=1)
    assert [s.update(m) for m in (1.0, float("nan"), 0.5)] == [False, True, True]
    s.reset()
    assert s.update(float("nan")) is True  # nothing but NaN: stops, no snapshot to restore
    s.reset()
    assert s.update(2.0) is False and s.best == 2.0


def test_snapshot_and_restore_bitwise(rng):
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(3)
    stopper = EarlyStopping(patience=2, params=[w, b])
    opt = fo.SGD([w, b], lr=0.1)
    best = None
    for loss in (5.0, 4.0, 3.0, 3.5, 3.2):
        if loss == 3.0:
            best = (w.copy(), b.copy())
        if stopper.update(loss):
            break
        opt.step([rng.standard_normal(w.shape).astype(np.float32), rng.standard_normal(3)])
    assert stopper.stopped and stopper.best == 3.0 and stopper.best_index == 2
    assert not np.array_equal(w, best[0])
    snap = stopper.best_params
    assert not snap[0].flags.writeable and snap[0].dtype == np.float32
    stopper.restore()
    np.testing.assert_array_equal(w, best[0])
    np.testing.assert_array_equal(b, best[1])


def test_restore_best_on_stop_and_one_copy_per_array():
    w = np.zeros(5)
    stopper = EarlyStopping(patience=1, mode="max", params=w, restore_best=True)
    assert len(stopper._snapshot) == 1 and stopper._snapshot[0].shape == (5,)
    w[:] = 1.0
    stopper.update(0.9)  # best accuracy, snapshot w = 1
    w[:] = 2.0
    assert stopper.update(0.8) is True
    np.testing.assert_array_equal(w, 1.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=-1)
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=1.5)
    with pytest.raises(ValueError, match="min_delta"):
        EarlyStopping(min_delta=-0.1)
    with pytest.raises(ValueError, match="mode"):
        EarlyStopping(mode="lowest")
    with pytest.raises(TypeError, match="NumPy array"):
        EarlyStopping(params=[[1.0, 2.0]])
    with pytest.raises(ValueError, match="needs the params"):
        EarlyStopping(restore_best=True)
    with pytest.raises(ValueError, match="without params"):
        EarlyStopping().restore()
    with pytest.raises(RuntimeError, match="no evaluation has improved"):
        EarlyStopping(params=np.zeros(1)).restore()
