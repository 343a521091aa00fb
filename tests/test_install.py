"""fastopt installed by pip: nothing it writes outlives ``pip uninstall``, and a read-only install
caches its kernels per user.

Found: the kernel cache lived in ``site-packages/fastopt/**/__pycache__``; after ``pip uninstall``
the leftover folder made ``import fastopt`` a namespace package without ``Adam`` under a later
``pip install -e .``, and a read-only install recompiled in every process.

One venv serves both tests (numpy, numba and setuptools come from this interpreter's
site-packages through a ``.pth`` file; fastopt is installed with ``--no-deps
--no-build-isolation``). The venv and the non-root user's cache live in a world-readable temporary
directory so that, run as root, the read-only test can run as ``nobody``."""

import os
import shutil
import site
import stat
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from pathlib import Path

import pytest

import fastopt

pytestmark = pytest.mark.install

CHECKOUT = Path(fastopt.__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "fastopt", "kernels", "examples")
TIMEOUT = 600

STEP = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import fastopt as fo
    from fastopt.kernels import _build, adam
    try:
        from fastopt.kernels._cache import cache_dir
    except ImportError:  # a fastopt that caches beside its sources
        cache_dir = lambda: ""
    w = np.zeros(1000, np.float32)
    fo.Adam([w], lr=1.0).step([np.ones_like(w)])
    k = _build.cpu_kernel(adam.ADAM, False)
    print(json.dumps({"file": fo.__file__, "w": float(w[0]), "dir": cache_dir(),
                      "hits": sum(k.stats.cache_hits.values()), "misses": sum(k.stats.cache_misses.values())}))
    """
)


def _nbfiles(root):
    return sorted(str(p) for p in Path(root).rglob("*") if p.suffix in (".nbi", ".nbc"))


@pytest.fixture(scope="module")
def venv():
    if not (CHECKOUT / "pyproject.toml").is_file():
        pytest.skip("needs the source checkout")
    if shutil.which("pip") is None and subprocess.run([sys.executable, "-m", "pip", "--version"],
                                                      capture_output=True).returncode:
        pytest.skip("pip is not available")
    root = Path(tempfile.mkdtemp(prefix="fastopt-install-"))
    try:
        root.chmod(0o755)  # readable by another user (the read-only test)
        src = root / "src"
        src.mkdir()
        ignore = shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc", "*.egg-info")
        for name in SOURCES:
            path = CHECKOUT / name
            if path.is_dir():
                shutil.copytree(path, src / name, ignore=ignore)
            elif path.exists():
                shutil.copy2(path, src / name)
        env_dir = root / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=TIMEOUT)
        python = env_dir / "bin" / "python"
        purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                      capture_output=True, text=True, check=True).stdout.strip())
        # numpy, numba, pip, setuptools, ... from this interpreter: links to everything in its
        # site-packages but fastopt itself (an installed fastopt there would shadow the tests')
        deps = root / "deps"
        deps.mkdir()
        for outer in dict.fromkeys([sysconfig.get_paths()["purelib"], *site.getsitepackages()]):
            for entry in Path(outer).iterdir() if Path(outer).is_dir() else ():
                name = entry.name.lower()
                if name.startswith(("fastopt", "__editable__", "_outer")) or name.endswith(".pth"):
                    continue
                if not (deps / entry.name).exists():
                    (deps / entry.name).symlink_to(entry)
        (purelib / "_outer.pth").write_text(f"{deps}\n")
        yield {"root": root, "src": src, "python": str(python), "purelib": purelib}
    finally:
        for dirpath, dirnames, filenames in os.walk(root):  # undo the read-only test's chmod
            os.chmod(dirpath, 0o755)
        shutil.rmtree(root, ignore_errors=True)


def _pip(venv, *args):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # pip must see the venv's fastopt only
    proc = subprocess.run([venv["python"], "-m", "pip", "--disable-pip-version-check", "-q", *args],
                          capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _install(venv, *args):
    _pip(venv, "uninstall", "-y", "fastopt")
    _pip(venv, "install", "--no-deps", "--no-build-isolation", "--no-index", *args)


def _env(cache_home):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "FASTOPT_CACHE_DIR", "NUMBA_CACHE_DIR", "FASTOPT_NO_CACHE")}
    return {**env, "XDG_CACHE_HOME": str(cache_home), "HOME": str(cache_home)}


def _step(venv, env, user=None):
    import json

    command = [venv["python"], "-c", STEP]
    if user is not None:
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=TIMEOUT, cwd=venv["root"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_uninstall_leaves_nothing_and_an_editable_install_then_works(venv):
    cache_home = venv["root"] / "cache-root"
    _install(venv, str(venv["src"]))
    run = _step(venv, _env(cache_home))
    assert run["w"] == -1.0 and run["file"].startswith(str(venv["purelib"]))
    installed = venv["purelib"] / "fastopt"
    assert _nbfiles(installed) == [], "kernel cache files were written into site-packages"
    assert _nbfiles(cache_home / "fastopt"), "nothing was cached in the per-user directory"

    _pip(venv, "uninstall", "-y", "fastopt")
    assert not installed.exists(), f"pip uninstall left {sorted(map(str, installed.rglob('*')))[:5]}"

    _install(venv, "-e", str(venv["src"]))
    run = _step(venv, _env(cache_home))
    assert run["w"] == -1.0 and run["file"] == str(venv["src"] / "fastopt" / "__init__.py")
    check = subprocess.run([venv["python"], "-c", "import fastopt; print(fastopt.Adam.__name__)"],
                           capture_output=True, text=True, timeout=TIMEOUT, env=_env(cache_home))
    assert check.stdout.strip() == "Adam", check.stderr


def test_read_only_install_caches_per_user(venv):
    """Installed by root, read-only, run by ``nobody`` (as root) or by this user (otherwise): the
    second process loads its kernels from the user's cache."""
    _install(venv, str(venv["src"]))
    installed = venv["purelib"] / "fastopt"
    for dirpath, dirnames, filenames in os.walk(installed):
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o444)
        os.chmod(dirpath, 0o555)
    user = None
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root, and no setpriv to run as another user")
        user = 65534  # nobody
    cache_home = venv["root"] / "nobody-cache"
    cache_home.mkdir()
    if user is not None:
        os.chown(cache_home, user, user)
    env = _env(cache_home)
    first = _step(venv, env, user)
    second = _step(venv, env, user)
    assert first["w"] == second["w"] == -1.0
    assert first["file"].startswith(str(installed))
    assert (first["misses"], second["hits"], second["misses"]) == (1, 1, 0), (first, second)
    assert first["dir"].startswith(str(cache_home / "fastopt")), first["dir"]
    assert _nbfiles(first["dir"]) and _nbfiles(installed) == []
    assert not stat.S_IMODE(os.stat(first["dir"]).st_mode) & 0o077, "the cache directory is open to other users"
