"""A small real model for the example server: least-squares linear regression, pure Python.

Trained at start on a fixed synthetic data set (y = 3·x0 − 2·x1 + 0.5·x2 + 1 + noise), so
the example needs no model artefact and no package beyond the standard library (the quick
start works from `pip install .` alone); predicting a row is one dot product.
"""

from __future__ import annotations

import random

FEATURES = 3
_TRUE = (3.0, -2.0, 0.5, 1.0)  # weights, then the bias


def solve(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    """x with matrix·x = rhs, by Gaussian elimination with partial pivoting."""
    n = len(rhs)
    rows = [list(matrix[i]) + [rhs[i]] for i in range(n)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(rows[r][col]))
        rows[col], rows[pivot] = rows[pivot], rows[col]
        for r in range(col + 1, n):
            factor = rows[r][col] / rows[col][col]
            for c in range(col, n + 1):
                rows[r][c] -= factor * rows[col][c]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (rows[r][n] - sum(rows[r][c] * x[c] for c in range(r + 1, n))) / rows[r][r]
    return x


class LinearModel:
    """y ≈ X·w + b, fitted by least squares (the normal equations, 4 × 4)."""

    def __init__(self, seed: int = 0, samples: int = 1000) -> None:
        rng = random.Random(seed)
        design = [[rng.gauss(0, 1) for _ in range(FEATURES)] + [1.0] for _ in range(samples)]
        y = [sum(w * v for w, v in zip(_TRUE, row)) + rng.gauss(0, 0.01) for row in design]
        size = FEATURES + 1
        normal = [[sum(row[i] * row[j] for row in design) for j in range(size)]
                  for i in range(size)]
        moments = [sum(row[i] * t for row, t in zip(design, y)) for i in range(size)]
        solution = solve(normal, moments)
        self.weights, self.bias = solution[:FEATURES], solution[FEATURES]

    def predict(self, rows: list[list[float]]) -> list[float]:
        """One prediction per row of `FEATURES` numbers (ValueError for any other shape)."""
        out = []
        for row in rows:
            values = [float(v) for v in row]
            if len(values) != FEATURES:
                raise ValueError(f"expected rows of {FEATURES} numbers")
            out.append(sum(w * v for w, v in zip(self.weights, values)) + self.bias)
        return out
