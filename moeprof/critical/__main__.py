"""`python -m moeprof.critical`: evaluations per search on synthetic curves (the figures in `search`'s docstring)."""

from __future__ import annotations

import math

import numpy as np

from moeprof.critical.search import DEFAULT_TARGET, find_critical
from moeprof.evaluate.point import EvalPoint


def main() -> None:
    """Print evaluations per search on synthetic curves (the figures quoted in the module docstring)."""
    curves = {
        "linear": lambda c: (lambda p: 1 - 0.01 * (1 - p) / (1 - c)),
        "quadratic": lambda c: (lambda p: 1 - 0.01 * ((1 - p) / (1 - c)) ** 2),
        "cubic": lambda c: (lambda p: 1 - 0.01 * ((1 - p) / (1 - c)) ** 3),
        "logistic": lambda c: (lambda p: 1 - 0.02 / (1 + math.exp((p - c) / 0.02))),
        "step": lambda c: (lambda p: 1.0 if p >= c else 0.5),
    }
    for check in (True, False):
        for name, family in curves.items():
            counts, errors = [], []
            for c in np.linspace(0.505, 0.985, 97):
                f = family(c)
                res = find_critical(lambda p: EvalPoint(p=p, score=1.0 if p is None else f(p)), check=check)
                grid = np.linspace(0.5, 1.0, 50001)
                true = grid[np.argmax([f(g) >= DEFAULT_TARGET - 1e-12 for g in grid])]
                counts.append(res.num_evaluations)
                errors.append(abs(res.critical_p - true))
            print(f"check={check!s:5} {name:9s} evaluations mean {np.mean(counts):.2f} max {max(counts):2d}   "
                  f"max |p - crossing| {max(errors):.4f}")


if __name__ == "__main__":
    main()
