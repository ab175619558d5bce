"""Experiment 1: the linear RNN, where the theory is exact: ∂h_T/∂h_t = (W^{T−t})ᵀ.

Measures ‖∂h_T/∂h_t‖₂ with ``jaxseq.gradients.jacobian_norms`` (autodiff through ``jaxseq.unroll``) for three
recurrent matrices (H = 32, T = 60): Gaussian rescaled to σ_max = 1.05 (non-normal), symmetric with
ρ = σ_max = 0.9, and orthogonal (all singular values 1). Compares with ‖W^{T−t}‖₂ computed on the host in
float64, and fits the slope of log‖·‖ against T − t.

Run (under a minute on 2 CPU cores)::

    .venv/bin/python scripts/gradnorm_linear.py

Expected: relative error ≤ 1e-4 in float32 (≈1e-15 in float64) for every t and matrix; for the symmetric
W the fitted slope equals log ρ(W) = log 0.9 to about 1e-12; the orthogonal W keeps every norm at 1 (an
isometry); the non-normal Gaussian W has σ_max = 1.05 > 1 but ρ ≈ 0.58, and its norms decay at about the rate ρ
(Gelfand: ‖W^k‖^{1/k} → ρ): σ_max > 1 allows growth, ρ decides the long run. Draws ``docs/figures/gradnorms_linear.png``.

Same measurement from the command line: ``jaxseq gradnorms --cell linear --init symmetric --steps 60
--hidden 32 --sigma-max 0.9 --out runs/gradnorms/linear``.
"""
from __future__ import annotations

import pathlib

import jax

jax.config.update("jax_enable_x64", True)  # far-apart norms reach 1e-3 .. 1e-30; float32 is shown separately
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxseq import gradients, plots  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
T, H = 60, 32
MATRICES = {"gaussian, sigma_max 1.05": ("gaussian", 1.05), "symmetric, rho 0.9": ("symmetric", 0.9),
            "orthogonal": ("orthogonal", 1.0)}


def measure(init: str, sigma: float, dtype):
    key = jax.random.PRNGKey(0)
    W = gradients.recurrent_matrix(key, H, sigma, init, jnp.float64)
    params = {"U": jnp.ones((1, H), dtype) / H, "W": W.astype(dtype), "b": jnp.zeros(H, dtype)}
    xs = jax.random.normal(jax.random.PRNGKey(1), (T, 1), dtype)
    norms = gradients.jacobian_norms(gradients.linear_rnn.apply, params, jnp.zeros(H, dtype), xs)
    return np.asarray(W), np.asarray(norms.spectral, np.float64)


def main() -> None:
    distance = np.asarray(gradients.distances(T))
    curves, theory = {}, {}
    print(f"{'matrix':<26}{'sigma_max':>10}{'rho':>8}{'max rel err f64':>17}{'f32':>10}{'slope':>10}{'log rho':>10}")
    for label, (init, sigma) in MATRICES.items():
        W, measured = measure(init, sigma, jnp.float64)
        _, measured32 = measure(init, sigma, jnp.float32)
        exact = gradients.linear_power_norms(W, T)
        rho = float(gradients.spectral_radius(W))
        rel = np.max(np.abs(measured - exact) / exact)
        rel32 = np.max(np.abs(measured32 - exact) / exact)
        slope = np.polyfit(distance, np.log(measured), 1)[0]
        print(f"{label:<26}{float(gradients.sigma_max(W)):>10.3f}{rho:>8.3f}{rel:>17.1e}{rel32:>10.1e}"
              f"{slope:>10.5f}{np.log(rho):>10.5f}")
        curves[label] = (measured, measured, measured)  # one matrix: no band
        theory[f"{label}: ||W^k|| (exact)"] = exact
        theory[f"{label}: rho^k"] = rho ** distance
    plots.plot_gradnorm_bands(distance, curves, ROOT / "docs" / "figures" / "gradnorms_linear.png", theory=theory,
                              ylabel="||dh_T/dh_t||_2 (log scale)",
                              title=f"linear RNN (H={H}): measured = ||W^(T-t)||, decay rate rho(W)")
    print("wrote docs/figures/gradnorms_linear.png")


if __name__ == "__main__":
    main()
