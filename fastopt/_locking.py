"""One lock per optimizer: ``step``, ``state_dict``, ``load_state_dict``, ``fastopt.save`` and
``fastopt.load`` of one optimizer never run at the same time.

The kernels release the GIL, so without it two threads stepping one optimizer run two updates
on the same buffers at once (Adam: every element wrong), and a save during a step writes
parameters and moments from different steps. Each optimizer gets a re-entrant lock (``save``
calls ``state_dict``; ``step`` of an optimizer over a FlatParams calls its engine's), made on
first use and kept in the instance's ``__dict__``, so the method bodies are untouched: the
methods are wrapped at their boundary by :func:`synchronized` (methods of the optimizer),
:func:`synchronized_on` (methods of an object that holds the optimizer, the FlatParams
engine) and :func:`synchronized_arg` (functions taking it first, ``save``/``load``).

Different optimizers never wait for each other. Concurrent calls on one optimizer run one after
the other in an unspecified order, so n threads each stepping once give the same result as n
serial steps when the gradients are the same (and some order of them otherwise).

After ``fork()`` a lock that another thread held at the fork would stay held in the child
forever (that thread does not exist there): a fork gives the child new locks (a generation
number, bumped in the child, marks the old ones stale).
"""

from __future__ import annotations

import functools
import os
import threading

_ATTR = "_fastopt_lock"
_generation = 0  # bumped in each forked child: locks of an older generation are replaced
_make_lock = threading.Lock()  # makes the first lock of an object exactly once


def _after_fork_in_child() -> None:
    global _generation, _make_lock
    _generation += 1
    _make_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def lock_of(obj) -> threading.RLock:
    """The lock of ``obj`` (an optimizer), made on first use."""
    entry = obj.__dict__.get(_ATTR)
    if entry is not None and entry[0] == _generation:
        return entry[1]
    with _make_lock:
        entry = obj.__dict__.get(_ATTR)
        if entry is None or entry[0] != _generation:
            entry = (_generation, threading.RLock())
            obj.__dict__[_ATTR] = entry
        return entry[1]


def synchronized(method):
    """Run ``method(self, ...)`` holding ``self``'s lock."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        entry = self.__dict__.get(_ATTR)
        lock = entry[1] if entry is not None and entry[0] == _generation else lock_of(self)
        with lock:
            return method(self, *args, **kwargs)

    return locked


def synchronized_on(attribute: str):
    """Run a method holding the lock of ``getattr(self, attribute)`` (the optimizer it serves)."""

    def wrap(method):
        @functools.wraps(method)
        def locked(self, *args, **kwargs):
            with lock_of(getattr(self, attribute)):
                return method(self, *args, **kwargs)

        return locked

    return wrap


def synchronized_arg(cls):
    """Run ``function(obj, ...)`` holding ``obj``'s lock when ``obj`` is a ``cls``; anything else
    goes through unlocked, for the function's own check to reject."""

    def wrap(function):
        @functools.wraps(function)
        def locked(obj, *args, **kwargs):
            if not isinstance(obj, cls):
                return function(obj, *args, **kwargs)
            with lock_of(obj):
                return function(obj, *args, **kwargs)

        return locked

    return wrap
