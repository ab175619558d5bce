"""Fits the rational tanh of the native LSTM kernel (jaxseq/native/lstm_cpu.cc, ``vtanh``) and prints it.

tanh(x) ≈ x·P(x²) / Q(x²) on [0, 9] (odd, so it holds on [-9, 9]; beyond, tanh rounds to ±1 in float32), with
P of degree 6 and Q of degree 3 in x², Q(0) = 1. Each round solves the linearised problem
x·P(x²) − tanh(x)·Q(x²) = 0 by weighted least squares, weighted for relative error by the last round's Q,
and Lawson's update multiplies the weights by the error, which moves the least-squares fit toward the minimax
one. The variable is x/9 during the fit, so that the powers up to x¹³ stay well conditioned.

Run (a few seconds)::

    .venv/bin/python scripts/fit_tanh.py

Expected: a relative error near 1e-8 in float64; evaluated in float32 (Horner, as the kernel does, but
without its fused multiply-adds), about 3.6e-7 at most, the rounding of the evaluation. Checked in C over every float32 in [0, 10) with the kernel's FMA
evaluation: at most 3.18e-7 from tanh, and up to 1.00000024 before the kernel's clamp to [-1, 1].
"""
from __future__ import annotations

import numpy as np

CLAMP = 9.0
NUMERATOR_TERMS, DENOMINATOR_TERMS = 7, 4  # P: x^0 .. x^12 in x², times x; Q: x^0 .. x^6


def fit(rounds: int = 60) -> tuple[np.ndarray, np.ndarray, float]:
    """(P, Q, relative error in float64): P[k] multiplies x^(2k+1), Q[k] multiplies x^(2k), Q[0] = 1."""
    x = np.concatenate([np.linspace(1e-4, CLAMP, 40000), np.geomspace(1e-6, 1e-1, 2000)])
    t = np.tanh(x)
    u = x / CLAMP
    u2 = u * u
    numerator = np.stack([u * u2**k for k in range(NUMERATOR_TERMS)], axis=1)
    denominator = np.stack([-t * u2**k for k in range(1, DENOMINATOR_TERMS)], axis=1)
    system = np.concatenate([numerator, denominator], axis=1)
    weights, q_last = np.ones_like(x), np.ones_like(x)
    for _ in range(rounds):
        scale = weights / (t * q_last)
        solution, *_ = np.linalg.lstsq(system * scale[:, None], t * scale, rcond=None)
        p = solution[:NUMERATOR_TERMS]
        q = np.concatenate([[1.0], solution[NUMERATOR_TERMS:]])
        q_last = np.polyval(q[::-1], u2)
        error = np.abs(u * np.polyval(p[::-1], u2) / q_last - t) / t
        weights = weights * error
        weights /= weights.mean()
    P = p / CLAMP ** (2 * np.arange(NUMERATOR_TERMS) + 1)
    Q = q / CLAMP ** (2 * np.arange(DENOMINATOR_TERMS))
    return P, Q, float(error.max())


def float32_error(P: np.ndarray, Q: np.ndarray) -> float:
    """Largest |approximation − tanh| on a 4.5e-6 grid of [-9, 9], evaluated in float32 as the kernel does."""
    x = np.linspace(-CLAMP, CLAMP, 4_000_001, dtype=np.float32)
    x2 = x * x
    P32, Q32 = P.astype(np.float32), Q.astype(np.float32)
    p = np.full_like(x, P32[-1])
    for c in P32[-2:0:-1]:
        p = p * x2 + c
    p = p * x2 * x + x * P32[0]
    q = np.full_like(x, Q32[-1])
    for c in Q32[-2::-1]:
        q = q * x2 + c
    return float(np.abs((p / q).astype(np.float64) - np.tanh(x.astype(np.float64))).max())


if __name__ == "__main__":
    P, Q, error = fit()
    print(f"relative error in float64: {error:.2e}; in float32: {float32_error(P, Q):.2e} (absolute)")
    print("P (x^1, x^3, ...):", ", ".join(f"{c:.9e}f" for c in P.astype(np.float32)))
    print("Q (x^0, x^2, ...):", ", ".join(f"{c:.9e}f" for c in Q.astype(np.float32)))
