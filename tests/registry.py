"""One table of optimizers and option sets that drives the tests and the benchmarks
(like torch's ``OptimizerInfo`` and optax's ``_OPTIMIZERS_UNDER_TEST``).

Each case names the fastopt class, its options, the reference rule in ``naive.py``, and the
``torch.optim`` class and options that must give the same numbers (``None`` where torch has
no equivalent, e.g. the seeds' eps-inside-sqrt forms).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import fastopt as fo


@dataclass(frozen=True)
class Case:
    id: str
    cls: type
    options: dict = field(default_factory=dict)
    torch_cls: str | None = None
    torch_options: dict | None = None

    @property
    def rule(self) -> str:
        return self.cls.kernel.__name__.rsplit(".", 1)[-1]

    def hyper(self) -> dict:
        """The complete hyper-parameters (defaults + options + the class's fixed ones)."""
        signature = inspect.signature(self.cls.__init__)
        defaults = {k: v.default for k, v in signature.parameters.items() if k not in ("self", "params")}
        return {**defaults, **self.options, **self.cls.forced}

    def make(self, params):
        return self.cls(params, **self.options)


def _case(id, cls, torch_cls=None, torch_extra=None, **options):
    torch_options = None if torch_cls is None else {**options, **(torch_extra or {})}
    return Case(id, cls, options, torch_cls, torch_options)


CASES = [
    _case("sgd", fo.SGD, "SGD", lr=0.1),
    _case("sgd-wd-maximize", fo.SGD, "SGD", lr=0.05, weight_decay=0.1, maximize=True),
    _case("sgd-momentum", fo.SGD, "SGD", lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
    _case("sgd-nesterov", fo.SGD, "SGD", lr=0.05, momentum=0.9, nesterov=True),
    _case("sgd-ema-seed000", fo.SGD, None, lr=0.1, momentum=0.9, dampening=0.9, momentum_init="zero"),
    _case("adagrad", fo.Adagrad, "Adagrad", lr=0.1),
    _case("adagrad-decay-init-wd", fo.Adagrad, "Adagrad", lr=0.1, lr_decay=0.05,
          initial_accumulator_value=0.1, weight_decay=0.01, maximize=True),
    _case("adagrad-eps-inside", fo.Adagrad, None, lr=0.1, eps=1e-6, eps_inside_sqrt=True),
    _case("adadelta", fo.Adadelta, "Adadelta"),
    _case("adadelta-wd-maximize", fo.Adadelta, "Adadelta", lr=0.5, rho=0.8, weight_decay=0.05, maximize=True),
    _case("rmsprop", fo.RMSprop, "RMSprop", lr=0.01),
    _case("rmsprop-centered", fo.RMSprop, "RMSprop", lr=0.01, centered=True, weight_decay=0.01),
    _case("rmsprop-momentum", fo.RMSprop, "RMSprop", lr=0.01, momentum=0.8, maximize=True),
    _case("rmsprop-centered-momentum", fo.RMSprop, "RMSprop", lr=0.01, alpha=0.9, centered=True, momentum=0.5),
    _case("rmsprop-eps-inside", fo.RMSprop, None, lr=0.01, eps=1e-6, eps_inside_sqrt=True),
    _case("rmsprop-centered-eps-inside", fo.RMSprop, None, lr=0.01, eps=1e-6, eps_inside_sqrt=True,
          centered=True, momentum=0.3),
    _case("adam", fo.Adam, "Adam", lr=0.01),
    _case("adam-wd-maximize", fo.Adam, "Adam", lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, maximize=True),
    _case("adam-amsgrad", fo.Adam, "Adam", lr=0.01, amsgrad=True, weight_decay=0.01),
    _case("adamw", fo.AdamW, "AdamW", lr=0.01),
    _case("adamw-amsgrad", fo.AdamW, "AdamW", lr=0.01, weight_decay=0.1, amsgrad=True),
    _case("adamax", fo.Adamax, "Adamax", lr=0.01),
    _case("adamax-wd-maximize", fo.Adamax, "Adamax", lr=0.01, weight_decay=0.05, maximize=True),
    _case("nadam", fo.NAdam, "NAdam", lr=0.01),
    _case("nadam-wd", fo.NAdam, "NAdam", lr=0.01, weight_decay=0.05, momentum_decay=0.01),
    _case("nadam-decoupled", fo.NAdam, "NAdam", lr=0.01, weight_decay=0.05, decoupled_weight_decay=True),
    _case("radam", fo.RAdam, "RAdam", lr=0.01),
    _case("radam-wd", fo.RAdam, "RAdam", lr=0.01, weight_decay=0.05, betas=(0.9, 0.9)),
    _case("radam-decoupled-maximize", fo.RAdam, "RAdam", lr=0.01, weight_decay=0.05,
          decoupled_weight_decay=True, maximize=True),
    # beta1 (alpha) below 0.5: torch's lerp switches to its other, end-anchored form there
    _case("adam-low-beta1", fo.Adam, "Adam", lr=0.01, betas=(0.2, 0.999)),
    _case("adamax-low-beta1", fo.Adamax, "Adamax", lr=0.01, betas=(0.3, 0.99)),
    _case("nadam-low-beta1", fo.NAdam, "NAdam", lr=0.01, betas=(0.1, 0.999)),
    _case("radam-low-beta1", fo.RAdam, "RAdam", lr=0.01, betas=(0.25, 0.9)),
    _case("rmsprop-centered-low-alpha", fo.RMSprop, "RMSprop", lr=0.01, alpha=0.3, centered=True),
]

TORCH_CASES = [c for c in CASES if c.torch_cls is not None]
