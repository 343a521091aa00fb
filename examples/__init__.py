"""Examples that use fastopt the way a user would; installed as ``fastopt.examples`` so that
``fastopt demo`` can run them, and runnable as scripts from a checkout:

- ``trajectories.py``: every optimizer from the same start on the Beale function, Rosenbrock's
  valley and a saddle point, drawn as paths over contour plots (seed 003, section 11).
- ``mlp_digits.py``: a NumPy multilayer perceptron on scikit-learn's digits, comparing batch,
  mini-batch and stochastic gradient descent and several optimizers (seed 003).
"""
