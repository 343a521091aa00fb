"""fastopt: gradient-descent optimizers as fused Numba kernels.

One pass over memory reads parameters, gradients and moment buffers and writes the new
values. The API follows ``torch.optim``::

    import numpy as np, fastopt as fo
    w = np.random.randn(256, 128).astype(np.float32)
    opt = fo.Adam([w], lr=1e-3)
    opt.step([gw])          # w updated in place
"""

from . import schedules
from .early_stopping import EarlyStopping
from .optimizer import Optimizer
from .optimizers import SGD, Adadelta, Adagrad, Adam, Adamax, AdamW, NAdam, RAdam, RMSprop
from .transforms import clip_grad_norm_, grad_norm

__version__ = "0.1.0"

__all__ = ["Optimizer", "SGD", "Adagrad", "Adadelta", "RMSprop", "Adam", "AdamW", "Adamax",
           "NAdam", "RAdam", "__version__"]
__all__ += ["EarlyStopping", "clip_grad_norm_", "grad_norm", "schedules"]
