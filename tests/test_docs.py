"""The examples in the public docstrings run and print what they say."""

import doctest
import importlib
import pkgutil

import pytest

import fastopt
import fastopt.optimizers


def _modules():
    names = ["fastopt", "fastopt.kernels", "fastopt.schedules", "fastopt.early_stopping"]
    names += [f"fastopt.optimizers.{m.name}" for m in pkgutil.iter_modules(fastopt.optimizers.__path__)]
    return names


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_every_optimizer_documents_its_math_and_defaults_match_the_kernel():
    import inspect

    for name in fastopt.optimizers.__all__:
        cls = getattr(fastopt, name)
        assert ".. math::" in cls.__doc__, f"{name} has no math in its docstring"
        params = inspect.signature(cls.__init__).parameters
        assert all(p.kind is p.KEYWORD_ONLY for n, p in params.items() if n not in ("self", "params"))
        transforms = ("clip_grad_norm", "skip_nonfinite", "grad_noise", "seed")  # every class: fastopt.transforms
        signature_defaults = {n: p.default for n, p in params.items() if n not in ("self", "params", *transforms)}
        assert {n: params[n].default for n in transforms} == dict.fromkeys(transforms, None) | {"skip_nonfinite": False}
        kernel_defaults = {k: v for k, v in cls.kernel.DEFAULTS.items() if k not in cls.forced}
        expected = dict(kernel_defaults, **({"weight_decay": 1e-2} if name == "AdamW" else {}))
        assert signature_defaults == expected, name
