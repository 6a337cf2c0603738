"""xpoptim: variance-adapted optimizers with the same numbers in PyTorch, JAX/optax, CuPy and NumPy.

* ``xpoptim.core``: the update rules, written once against the Python Array API.
* ``xpoptim.adapters``: ``torch`` (torch.optim.Optimizer classes), ``optax`` (GradientTransformations),
  ``array`` / ``numpy`` / ``cupy`` (optimizers over plain arrays).
* ``xpoptim.matrix``: the cross-backend equivalence verifier (``python -m xpoptim.matrix``).
* ``xpoptim.testing``: ``assert_backends_agree`` for your own code.
"""

from ._version import __version__

__all__ = ["__version__"]
