"""fastopt: gradient-descent optimizers as fused Numba kernels.

One pass over memory reads parameters, gradients and moment buffers and writes the new
values. The API follows ``torch.optim``::

    import numpy as np, fastopt as fo
    w = np.random.randn(256, 128).astype(np.float32)
    opt = fo.Adam([w], lr=1e-3)
    opt.step([gw])          # w updated in place
"""

import os as _os

# Installed, ``kernels/`` is the subpackage ``fastopt.kernels`` (a setuptools package-dir
# mapping). Run from a source checkout (``python -m pytest``, ``python examples/...``), it
# sits beside this package: let ``fastopt.kernels`` resolve there too.
_checkout = _os.path.dirname(_os.path.dirname(__file__))
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")) and _os.path.isfile(
    _os.path.join(_checkout, "kernels", "_build.py")
):
    __path__.append(_checkout)

from . import schedules  # noqa: E402
from .checkpoint import CheckpointError, load, save  # noqa: E402
from .early_stopping import EarlyStopping  # noqa: E402
from .flat import FlatParams  # noqa: E402
from .optimizer import Optimizer  # noqa: E402
from .optimizers import SGD, Adadelta, Adagrad, Adam, Adamax, AdamW, NAdam, RAdam, RMSprop  # noqa: E402
from .transforms import clip_grad_norm_, grad_norm  # noqa: E402

__version__ = "0.1.0"

__all__ = ["Optimizer", "SGD", "Adagrad", "Adadelta", "RMSprop", "Adam", "AdamW", "Adamax",
           "NAdam", "RAdam", "__version__"]
__all__ += ["EarlyStopping", "clip_grad_norm_", "grad_norm", "schedules"]
__all__ += ["FlatParams", "save", "load", "CheckpointError"]
