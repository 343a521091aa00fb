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
forever (that thread does not exist there): a forked child unlocks every lock held by a thread
other than the one that forked. ``copy.deepcopy`` of an optimizer gives the copy its own lock.
"""

from __future__ import annotations

import _thread
import functools
import inspect
import os
import threading
import weakref

_ATTR = "_fastopt_lock"
_locks: weakref.WeakSet = weakref.WeakSet()  # every lock made, for the fork handler
_make_lock = threading.Lock()  # makes the first lock of an object exactly once


class _Lock(_thread.RLock):
    """A re-entrant lock that a copy of its optimizer does not share: ``copy.deepcopy`` (and
    pickling) of an optimizer gives the copy a new, unlocked one."""

    def __deepcopy__(self, memo):
        return _new_lock()

    def __reduce__(self):
        return _new_lock, ()


def _new_lock() -> _Lock:
    lock = _Lock()
    _locks.add(lock)
    return lock


def _after_fork_in_child() -> None:
    """Unlock, in a forked child, every lock that another thread held at fork(): that thread
    does not exist here and would never release it."""
    global _make_lock
    _make_lock = threading.Lock()
    for lock in list(_locks):
        if not lock._is_owned():  # held by the thread that forked: it releases it itself
            lock._at_fork_reinit()


if hasattr(os, "register_at_fork") and hasattr(_thread.RLock, "_at_fork_reinit"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def lock_of(obj) -> _Lock:
    """The lock of ``obj`` (an optimizer), made on first use."""
    try:
        return obj.__dict__[_ATTR]
    except KeyError:
        pass
    with _make_lock:
        lock = obj.__dict__.get(_ATTR)
        if lock is None:
            lock = obj.__dict__[_ATTR] = _new_lock()
        return lock


_LOCKED_TEMPLATE = """
def {name}({params}):
    try:
        lock = {self}.__dict__[_ATTR]
    except KeyError:
        lock = lock_of({self})
    lock.acquire()
    try:
        return method({params})
    finally:
        lock.release()
"""


def synchronized(method):
    """Run ``method(self, ...)`` holding ``self``'s lock.

    This runs at every step, so the wrapper is cheap: acquire/release rather than ``with``,
    and, for a method whose parameters are all plain (no defaults, no ``*args``), a wrapper
    with the same parameters rather than ``*args, **kwargs`` forwarding (about 2x the cost)."""
    sig = inspect.signature(method)
    names = list(sig.parameters)
    plain = all(p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty for p in sig.parameters.values())
    if plain and names and all(n.isidentifier() and n not in ("lock", "method") for n in names):
        namespace = {"_ATTR": _ATTR, "lock_of": lock_of, "method": method}
        exec(_LOCKED_TEMPLATE.format(name=method.__name__, params=", ".join(names), self=names[0]), namespace)
        return functools.wraps(method)(namespace[method.__name__])

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        try:
            lock = self.__dict__[_ATTR]
        except KeyError:
            lock = lock_of(self)
        lock.acquire()
        try:
            return method(self, *args, **kwargs)
        finally:
            lock.release()

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
