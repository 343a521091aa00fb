"""fastopt's on-disk kernel cache: where it lives, what keys it, and what happens when it is damaged.

Numba's own ``cache=True`` writes next to the source (``site-packages/fastopt/**/__pycache__``):
those files outlive ``pip uninstall`` (and the folder they leave shadows a later editable
install), and a read-only install cannot cache at all. fastopt's kernels use this cache instead,
attached to each kernel's dispatcher by :func:`jit`; the user's own Numba functions are not
affected.

- **Where**: :func:`cache_dir`, a per-user directory: ``$FASTOPT_CACHE_DIR`` if set, else
  ``$NUMBA_CACHE_DIR/fastopt`` if set, else the platform's user cache directory
  (``$XDG_CACHE_HOME/fastopt`` or ``~/.cache/fastopt`` on Linux), then one sub-directory per
  :func:`cache_key`.
- **Key**: fastopt's version, a hash of every source file of ``fastopt.kernels``, the compile
  settings of ``_config``, the Numba, llvmlite and Python versions and the Numba settings that
  change generated code (``NUMBA_OPT``, vectorizer switches, ...). An upgrade, an edit or another
  setting never loads a kernel built from other code. Within a key, Numba's own index keys each
  entry by signature, CPU name and CPU features, and checks the content hash of the source file.
- **Damage**: every index (``.nbi``) and data (``.nbc``) file is written with a SHA-256 of its
  contents and checked before it is unpickled. A file that is truncated, bit-flipped, empty,
  garbage or unreadable (or that unpickles but cannot be loaded) is deleted, a
  :class:`KernelCacheWarning` says so, and the kernel is compiled again and re-cached. Damage
  never raises and never runs damaged code; neither does a file that cannot be written (a full
  disk, a directory made read-only after the probe): a warning, and the kernel stays compiled.
- **Writes**: Numba's (a temporary file, then an atomic rename), so processes sharing the
  directory see whole files or none.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import os
import pickle
import sys
import tempfile
import warnings

from . import _config

#: The first bytes of every file fastopt writes into the cache (the format's version).
MAGIC = b"fastopt-kernel-cache-1\n"
_DIGEST = hashlib.sha256().digest_size


class KernelCacheWarning(RuntimeWarning):
    """A kernel cache file was damaged and has been discarded (the kernel is recompiled)."""


def cache_root() -> str:
    """The directory that holds fastopt's cache (one sub-directory per :func:`cache_key`)."""
    explicit = os.environ.get("FASTOPT_CACHE_DIR")
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    from numba.core import config

    if config.CACHE_DIR:  # NUMBA_CACHE_DIR
        return os.path.join(os.path.abspath(os.path.expanduser(config.CACHE_DIR)), "fastopt")
    from numba.misc.appdirs import AppDirs

    return AppDirs(appname="fastopt", appauthor=False).user_cache_dir  # honours XDG_CACHE_HOME


def cache_dir() -> str:
    """The directory this process's kernels are cached in: ``cache_root()/<cache_key()>``."""
    return os.path.join(cache_root(), cache_key())


@functools.cache
def cache_key() -> str:
    """``<fastopt version>-<hash>`` of everything a cached kernel was built from (module doc)."""
    import llvmlite
    import numba
    from numba.core import config

    h = hashlib.sha256()
    here = os.path.dirname(os.path.abspath(__file__))
    for name in sorted(os.listdir(here)):  # every kernel source: rules, templates, settings
        if name.endswith(".py"):
            h.update(name.encode() + b"\0")
            with open(os.path.join(here, name), "rb") as f:
                h.update(f.read())
    settings = (sorted(_config.FASTMATH), _config.ERROR_MODEL, _config.CHUNK, _config.PREFETCH_BYTES,
                numba.__version__, llvmlite.__version__, sys.version, sys.platform)
    numba_settings = tuple(getattr(config, name, None) for name in (
        "OPT", "LOOP_VECTORIZE", "SLP_VECTORIZE", "ENABLE_AVX", "BOUNDSCHECK", "DEBUGINFO_DEFAULT",
        "CPU_NAME", "CPU_FEATURES", "USE_LLVMLITE_MEMORY_MANAGER"))
    h.update(repr((settings, numba_settings)).encode())
    return f"{_version()}-{h.hexdigest()[:16]}"


def _version() -> str:
    fastopt = sys.modules.get("fastopt")
    return str(getattr(fastopt, "__version__", "0"))


def ensure_writable(path: str | None = None) -> str:
    """Create the cache directory (user-only permissions) and check a file can be written there;
    ``OSError`` if not. Returns the directory."""
    path = path or cache_dir()
    os.makedirs(path, mode=0o700, exist_ok=True)
    tempfile.TemporaryFile(dir=path).close()
    return path


def jit(py_func, *, cache: bool | None = None, **options):
    """``numba.njit(**options)(py_func)`` whose compiled code is kept in fastopt's cache.

    ``cache=None`` caches when :func:`fastopt.kernels._config.cache_enabled`; ``False`` never
    (a dispatcher whose LLVM IR and assembly can be inspected). ``options`` must not hold
    ``cache``: Numba's own cache would put the files beside the source.
    """
    from numba import njit

    dispatcher = njit(**options)(py_func)
    if _config.cache_enabled() if cache is None else cache:
        dispatcher._cache = KernelCache(py_func)  # what Dispatcher.enable_caching does, with our class
    return dispatcher


def _classes():
    """The cache classes, built on first use (they subclass Numba's, imported with Numba)."""
    from numba.core import caching
    from numba.core.serialize import dumps

    class Locator(caching._SourceFileBackedLocatorMixin, caching._CacheLocator):
        """Every fastopt kernel in :func:`cache_dir`, stamped by its source file's contents."""

        def __init__(self, py_func, py_file):
            self._py_file = py_file
            self._lineno = py_func.__code__.co_firstlineno
            self._cache_path = cache_dir()

        def ensure_cache_path(self):
            ensure_writable(self._cache_path)

        def get_cache_path(self):
            return self._cache_path

    class CheckedFile(caching.IndexDataCacheFile):
        """Numba's index and data files, each framed as ``MAGIC + sha256(payload) + payload``
        and checked before it is unpickled; a damaged file is deleted with a warning."""

        def _save_index(self, overloads):
            payload = dumps((self._version, self._source_stamp, overloads))
            with self._open_for_write(self._index_path) as f:
                f.write(_frame(payload))

        def _load_index(self):
            payload = self._read_checked(self._index_path)
            if payload is None:
                return {}
            try:
                version, stamp, overloads = pickle.loads(payload)
                if not isinstance(overloads, dict):
                    raise TypeError(f"the index holds a {type(overloads).__name__}, not a dict")
            except Exception as exc:  # noqa: BLE001 - any unreadable index is damage
                _discard(self._index_path, f"{type(exc).__name__}: {exc}")
                return {}
            if version != self._version or stamp != self._source_stamp:
                return {}  # another Numba or an edited source: stale, overwritten by the next save
            return overloads

        def _save_data(self, name, data):
            with self._open_for_write(self._data_path(name)) as f:
                f.write(_frame(dumps(data)))

        def _load_data(self, name):
            path = self._data_path(name)
            payload = self._read_checked(path)
            if payload is None:
                raise FileNotFoundError(path)  # Numba's load() treats OSError as "no entry"
            try:
                return pickle.loads(payload)
            except Exception as exc:  # noqa: BLE001
                _discard(path, f"{type(exc).__name__}: {exc}")
                raise FileNotFoundError(path) from None

        def _read_checked(self, path):
            """The payload of ``path``, or ``None`` (missing, or damaged: then deleted)."""
            try:
                with open(path, "rb") as f:
                    raw = f.read()
            except FileNotFoundError:
                return None
            except OSError as exc:
                _discard(path, f"unreadable: {exc}")
                return None
            head = len(MAGIC) + _DIGEST
            if len(raw) < head or not raw.startswith(MAGIC):
                _discard(path, f"not a fastopt cache file ({len(raw)} bytes)")
                return None
            payload = raw[head:]
            if hashlib.sha256(payload).digest() != raw[len(MAGIC):head]:
                _discard(path, "checksum mismatch (truncated or modified)")
                return None
            return payload

    class Impl(caching.CompileResultCacheImpl):
        """Numba's compile-result cache with :class:`Locator` as its only locator (Numba's
        ``NUMBA_CACHE_LOCATOR_CLASSES`` does not move fastopt's kernels)."""

        def __init__(self, py_func):
            self._lineno = py_func.__code__.co_firstlineno
            source = os.path.abspath(inspect.getfile(py_func))  # generated kernels: _build.py
            self._locator = Locator(py_func, source)
            modname = os.path.splitext(os.path.basename(source))[0]
            qualname = getattr(py_func, "__qualname__", py_func.__name__)
            self._filename_base = self.get_filename_base(f"{modname}.{qualname}", getattr(sys, "abiflags", ""))

    class Cache(caching.FunctionCache):
        _impl_class = Impl

        def __init__(self, py_func):
            super().__init__(py_func)
            self._cache_file = CheckedFile(cache_path=self._cache_path, filename_base=self._impl.filename_base,
                                           source_stamp=self._impl.locator.get_source_stamp())

        def save_overload(self, sig, data):
            try:
                super().save_overload(sig, data)
            except Exception as exc:  # noqa: BLE001 - the kernel is compiled: a failed write must not stop the step
                warnings.warn(f"fastopt: could not write a compiled kernel of {self._name} to the cache "
                              f"({type(exc).__name__}: {exc}); it is compiled again in the next process",
                              KernelCacheWarning, stacklevel=2)

        def _load_overload(self, sig, target_context):
            try:
                return super()._load_overload(sig, target_context)
            except Exception as exc:  # noqa: BLE001 - an entry that passed its checksum but cannot be loaded
                warnings.warn(f"fastopt: a cached kernel of {self._name} could not be loaded "
                              f"({type(exc).__name__}: {exc}); compiling it again", KernelCacheWarning, stacklevel=2)
                return None

    return Cache


def _frame(payload: bytes) -> bytes:
    return MAGIC + hashlib.sha256(payload).digest() + payload


def _discard(path: str, reason: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
    warnings.warn(f"fastopt: discarded the damaged kernel cache file {path} ({reason}); the kernel is "
                  "compiled again", KernelCacheWarning, stacklevel=2)


_cache_class = None


def KernelCache(py_func):  # noqa: N802 - a class, built lazily
    """The cache of one kernel's dispatcher (a subclass of Numba's ``FunctionCache``)."""
    global _cache_class
    if _cache_class is None:
        _cache_class = _classes()
    return _cache_class(py_func)
