r"""Early stopping: stop when a validation metric has not improved for ``patience`` evaluations,
optionally keeping a copy of the best parameters.

"You should thus always monitor error on a validation set during training and stop (with
some patience) if your validation error does not improve enough" (seed 003, after Hinton).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

from ._validation import check_array_type

__all__ = ["EarlyStopping"]


class EarlyStopping:
    r"""Watch a metric; say when to stop; remember (and restore) the best parameters.

    An evaluation :math:`m` *improves* on the best value :math:`b` when
    :math:`m < b - \delta` (``mode="min"``) or :math:`m > b + \delta` (``mode="max"``),
    :math:`\delta` = ``min_delta``; the first finite evaluation always improves and NaN never
    does. :meth:`update` returns ``True`` once ``patience`` evaluations in a row have not
    improved (Keras' rule: ``patience=0`` stops at the first one), and keeps returning
    ``True`` until :meth:`reset`.

    Parameters
    ----------
    patience : int >= 0
    min_delta : float >= 0, the smallest change that counts as an improvement
    mode : ``"min"`` (a loss) or ``"max"`` (an accuracy)
    params : array or sequence of arrays, optional
        Arrays to snapshot at each improvement: one preallocated copy per array (with a
        ``FlatParams``, pass its one buffer: one copy for the whole model). ``np.ndarray``
        or ``np.memmap`` (snapshots are plain arrays); other subclasses are a TypeError.
    restore_best : bool
        Copy the best snapshot back into ``params`` when :meth:`update` first returns ``True``.

    Examples
    --------
    >>> import numpy as np
    >>> w = np.zeros(2)
    >>> stopper = EarlyStopping(patience=2, params=[w])
    >>> for epoch, loss in enumerate([3.0, 2.0, 2.5, 2.1, 1.0]):
    ...     w[:] = epoch                    # training changes w
    ...     if stopper.update(loss):
    ...         break
    >>> epoch, stopper.best, stopper.best_index
    (3, 2.0, 1)
    >>> stopper.restore(); w
    array([1., 1.])
    """

    def __init__(self, patience: int = 10, min_delta: float = 0.0, mode: str = "min", *,
                 params: np.ndarray | Sequence[np.ndarray] | None = None, restore_best: bool = False):
        if isinstance(patience, bool) or not isinstance(patience, numbers.Integral) or patience < 0:
            raise ValueError(f"patience must be an integer >= 0, got {patience!r}")
        if isinstance(min_delta, bool) or not isinstance(min_delta, numbers.Real) \
                or not math.isfinite(min_delta) or min_delta < 0:
            raise ValueError(f"min_delta must be a finite number >= 0, got {min_delta!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.mode = mode
        if params is None:
            self.params: list[np.ndarray] = []
        else:
            arrays = [params] if isinstance(params, np.ndarray) else list(params)
            for i, p in enumerate(arrays):
                if not isinstance(p, np.ndarray):
                    raise TypeError(f"params[{i}] must be a NumPy array, got {type(p).__name__}")
                check_array_type(p, f"params[{i}]")
            self.params = arrays
        if restore_best and not self.params:
            raise ValueError("restore_best=True needs the params to snapshot")
        self.restore_best = bool(restore_best)
        if self.restore_best:
            self._check_writeable()
        self._snapshot = [np.empty_like(p, subok=False) for p in self.params]  # plain arrays
        self.reset()

    def reset(self) -> None:
        """Forget the history (the snapshot buffers are kept and reused)."""
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_index: int | None = None
        self.num_updates = 0
        self.num_bad = 0
        self.stopped = False

    def _improves(self, metric: float) -> bool:
        if self.best_index is None:
            return not math.isnan(metric)
        if self.mode == "min":
            return metric < self.best - self.min_delta
        return metric > self.best + self.min_delta

    def update(self, metric: float) -> bool:
        """Record one evaluation; return whether training should stop."""
        metric = float(metric)
        index = self.num_updates
        self.num_updates += 1
        if self._improves(metric):
            self.best, self.best_index, self.num_bad = metric, index, 0
            for dst, src in zip(self._snapshot, self.params):
                np.copyto(dst, src)
        else:
            self.num_bad += 1
        if not self.stopped and 0 < self.num_bad and self.patience <= self.num_bad:
            self.stopped = True
            if self.restore_best and self.best_index is not None:
                self.restore()
        return self.stopped

    @property
    def best_params(self) -> list[np.ndarray]:
        """The snapshot of the best parameters (read-only views)."""
        if self.best_index is None:
            raise RuntimeError("no evaluation has improved yet, so there is no best snapshot")
        views = [s.view() for s in self._snapshot]
        for v in views:
            v.flags.writeable = False
        return views

    def restore(self) -> None:
        """Copy the best snapshot back into the params, in place."""
        if not self.params:
            raise ValueError("EarlyStopping was built without params; there is nothing to restore")
        if self.best_index is None:
            raise RuntimeError("no evaluation has improved yet, so there is no best snapshot")
        self._check_writeable()  # all or nothing: no array restored unless every one can be
        for dst, src in zip(self.params, self._snapshot):
            np.copyto(dst, src)

    def _check_writeable(self) -> None:
        for i, p in enumerate(self.params):
            if not p.flags.writeable:
                raise ValueError(f"params[{i}] is read-only; restoring the best parameters writes them in place")

    def __repr__(self) -> str:
        return (f"EarlyStopping(patience={self.patience}, min_delta={self.min_delta:g}, mode={self.mode!r}, "
                f"best={self.best:g} at {self.best_index}, bad={self.num_bad}, stopped={self.stopped})")
