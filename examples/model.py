"""A small real model for the example server: least-squares linear regression in NumPy.

Trained at start on a fixed synthetic data set (y = 3·x0 − 2·x1 + 0.5·x2 + 1 + noise), so
the example needs no model artefact; predicting a row is one matrix product.
"""

from __future__ import annotations

import numpy as np

FEATURES = 3


class LinearModel:
    """y ≈ X·w + b, fitted by least squares."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(1000, FEATURES))
        y = x @ np.array([3.0, -2.0, 0.5]) + 1.0 + rng.normal(scale=0.01, size=1000)
        design = np.hstack([x, np.ones((len(x), 1))])
        solution, *_ = np.linalg.lstsq(design, y, rcond=None)
        self.weights, self.bias = solution[:FEATURES], float(solution[FEATURES])

    def predict(self, rows: list[list[float]]) -> list[float]:
        """One prediction per row of `FEATURES` numbers."""
        x = np.asarray(rows, dtype=float).reshape(-1, FEATURES)
        return [float(v) for v in x @ self.weights + self.bias]
