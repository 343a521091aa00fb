"""Numba's threading layer under ``fork()`` and threads: the parallel kernels never kill or hang
a process.

Numba runs ``prange`` loops on one of three threading layers, chosen at the first parallel
launch (``numba.threading_layer()`` says which): ``tbb`` (Intel TBB: fork-safe and
thread-safe), ``omp`` (OpenMP: thread-safe; on Linux it is GNU OpenMP, which cannot run in a
child forked after it started: Numba kills the child with ``Terminating: fork() called from a
process already using GNU OpenMP``, and a fork-start ``multiprocessing.Pool`` hangs) and
``workqueue`` (fork-safe, but a second thread launching a parallel loop while one runs aborts
the process). fastopt handles each:

- **TBB first.** fastopt depends on ``tbb`` where PyPI has wheels for it. Numba looks for
  ``libtbb.so.12`` by name only, which a virtual environment's ``lib/`` is not on the search
  path for, so Numba would fall back to ``omp`` silently; :func:`preload_tbb` (run when
  ``fastopt.kernels`` is imported) loads the wheel's library by its full path first, so Numba's
  own lookup finds it. Numba checks the version (TBB 2021.6, interface 12060, or later) and
  falls back to ``omp`` with a ``NumbaWarning`` if it is older; a future TBB with another ABI
  has another soname, is not preloaded, and the fallback below applies. A user's explicit
  ``NUMBA_THREADING_LAYER=omp`` or ``workqueue`` is respected: nothing is preloaded.
- **Fork fallback.** In a child forked from a process whose layer cannot run there (``omp``
  on Linux; ``tbb`` when the fork came from a thread other than the main one, which leaves TBB
  in an undefined state), every parallel entry point (the update kernels, the noise kernels,
  the norm reduction) runs its serial kernel instead, with one ``RuntimeWarning`` per process.
  The serial and parallel kernels give the same numbers bit for bit, so a child computes what
  its parent would, on one thread. A child forked before the parent ran any parallel kernel
  starts the layer itself and runs in parallel.
- **Concurrent launches.** Under ``workqueue`` parallel launches are serialized by one
  process-wide lock (fastopt's own; another library's parallel Numba code can still collide).

:class:`ParallelKernel` wraps each parallel dispatcher and does all of this at its call, so
every cached kernel, whenever it was made, follows the process's current state. Serial kernels
are never wrapped: a small step pays nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import warnings

#: Layers that cannot run in a child forked after the parent started them, per platform
#: (GNU OpenMP is Numba's ``omp`` on Linux; elsewhere its OpenMP is fork-safe).
FORK_UNSAFE = {"omp"} if sys.platform.startswith("linux") else set()

_TBB_NAMES = {"linux": "libtbb.so.12", "darwin": "libtbb.12.dylib", "win32": "tbb12.dll"}


class _State:
    """This process's view of the threading layer (reset in a forked child)."""

    serial_only: str | None = None  # why the parallel kernels run serially here, or None
    launch_lock: threading.Lock | None = None  # serializes parallel launches (workqueue)
    layer: str | None = None  # the layer, once a parallel kernel ran
    warned = False
    fork_from_main = True  # whether the last fork() of this process was from its main thread
    tbb_preloaded: str | None = None  # the library :func:`preload_tbb` loaded


state = _State()
_init_lock = threading.Lock()


def _explicit_layer() -> str:
    """The layer the user asked for (``default`` when none): the environment, or Numba's config
    if it was set in code before fastopt was imported."""
    layer = os.environ.get("NUMBA_THREADING_LAYER")
    if layer is None:
        try:
            from numba import config

            layer = config.THREADING_LAYER
        except Exception:  # noqa: BLE001 - no Numba config: nothing to respect
            layer = "default"
    return str(layer).lower()


def tbb_library() -> str | None:
    """The full path of the TBB runtime library installed by the ``tbb`` package, or None."""
    name = _TBB_NAMES.get(sys.platform)
    if name is None:
        return None
    prefixes = [sys.prefix]
    try:
        import site

        prefixes.append(site.getuserbase())
    except Exception:  # noqa: BLE001 - no user site (embedded interpreters)
        pass
    subdirs = ("Library/bin", "bin", "lib") if sys.platform == "win32" else ("lib",)
    for prefix in prefixes:
        for sub in subdirs:
            path = os.path.join(prefix, sub, name)
            if os.path.isfile(path):
                return path
    try:  # unusual layouts (pip --target, a wheel unpacked elsewhere): the package's own record
        import importlib.metadata

        for f in importlib.metadata.files("tbb") or ():
            if f.name == name:
                return str(f.locate())
    except Exception:  # noqa: BLE001 - not installed or no record
        pass
    return None


def preload_tbb() -> str | None:
    """Load the ``tbb`` package's library so that Numba's TBB layer finds it (see the module
    docstring); the path loaded, or None when nothing was (no TBB, or another layer requested,
    or Numba already chose its layer)."""
    if _explicit_layer() in ("omp", "workqueue") or _initialized_layer() is not None:
        return None
    path = tbb_library()
    if path is None:
        return None
    try:
        ctypes.CDLL(path)
    except OSError as exc:
        warnings.warn(f"fastopt: cannot load TBB from {path} ({exc}); Numba will use another threading "
                      "layer (in a forked child the parallel kernels then run serially)", RuntimeWarning,
                      stacklevel=2)
        return None
    state.tbb_preloaded = path
    return path


def _initialized_layer() -> str | None:
    """Numba's threading layer if it has started in this process (copied by fork), else None."""
    if "numba" not in sys.modules:
        return None
    import numba

    try:
        return numba.threading_layer()
    except ValueError:  # "Threading layer is not initialized."
        return None


def _start_layer() -> None:
    """Start Numba's threading layer now (as its first parallel launch would) and note which
    it is. Under ``workqueue``, make the launch lock."""
    with _init_lock:
        if state.layer is not None:
            return
        from numba.np.ufunc import parallel

        parallel._launch_threads()  # what Numba does at the first parallel launch
        layer = _initialized_layer()
        if layer == "workqueue" and state.launch_lock is None:
            state.launch_lock = threading.Lock()
        state.layer = layer


def fork_safe() -> bool:
    """Whether parallel kernels run in parallel in a process forked from this one now."""
    layer = _initialized_layer()
    if layer is None:
        return True
    if layer in FORK_UNSAFE:
        return False
    return layer != "tbb" or threading.current_thread() is threading.main_thread()


def _before_fork() -> None:
    state.fork_from_main = threading.current_thread() is threading.main_thread()


def _after_fork_in_child() -> None:
    global _init_lock
    _init_lock = threading.Lock()  # as below: a lock held by another thread at fork() stays held
    layer = _initialized_layer()
    state.layer = None  # started again (or found started) at the child's first parallel launch
    state.warned = False
    if state.launch_lock is not None:  # a lock another thread held at fork() stays held here
        state.launch_lock = threading.Lock()
    if state.serial_only is not None:  # inherited: a grandchild is no better off
        return
    if layer in FORK_UNSAFE:
        state.serial_only = (f"this process was forked from one that had started Numba's {layer!r} threading "
                             "layer, which cannot run in a forked child")
    elif layer == "tbb" and not state.fork_from_main:
        state.serial_only = ("this process was forked from a thread other than the main one, which leaves "
                             "Numba's TBB threading layer in an undefined state")


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def _warn_serial() -> None:
    state.warned = True
    warnings.warn(f"fastopt: {state.serial_only}; the parallel kernels run serially in this process (same "
                  "numbers, one thread). For parallel kernels in forked workers install TBB (pip install tbb) "
                  "or use the 'spawn' or 'forkserver' start method.", RuntimeWarning, stacklevel=3)


class ParallelKernel:
    """A parallel Numba dispatcher that follows the process's threading state (module
    docstring): the serial kernel in a fork-unsafe child, one launch at a time under
    ``workqueue``, else the parallel kernel itself. Attributes (``signatures``,
    ``py_func``, ...) are the parallel dispatcher's."""

    __slots__ = ("parallel", "_serial", "_make_serial")

    def __init__(self, parallel, make_serial):
        self.parallel = parallel
        self._serial = None
        self._make_serial = make_serial

    def __call__(self, *args):
        if state.layer is None and state.serial_only is None:
            _start_layer()
        if state.serial_only is not None:
            if not state.warned:
                _warn_serial()
            serial = self._serial
            if serial is None:
                serial = self._serial = self._make_serial()
            return serial(*args)
        lock = state.launch_lock
        if lock is None:
            return self.parallel(*args)
        with lock:
            return self.parallel(*args)

    def __getattr__(self, name):
        if name in ParallelKernel.__slots__:  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.parallel, name)

    def __repr__(self) -> str:
        return f"ParallelKernel({self.parallel!r})"
