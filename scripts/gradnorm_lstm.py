"""Experiment 3: how much gradient reaches t = 1 at T = 100 — LSTM (forget bias 1 and 0) against tanh RNNs.

Four models at their initialisation, 16 random draws each, all on adding-problem inputs (T = 100, H = 32):
LSTM with forget bias 1 and with 0 (the cells' usual init: Glorot input kernel, orthogonal recurrent
blocks), a tanh RNN with a Gaussian recurrent matrix rescaled to σ_max = 0.9, and a tanh RNN with an
orthogonal recurrent matrix (σ_max = 1, the third line). Measured with ``jaxseq.gradients.jacobian_norms``:
the full-state ‖∂s_T/∂s_t‖₂ (LSTM state = (h, c)), the LSTM cell path ‖∂c_T/∂c_t‖₂ and the direct-path
theory max Π f. Each model's 16 draws run ``vmap``-ped in one compiled call.

Run (about a minute on 2 CPU cores)::

    .venv/bin/python scripts/gradnorm_lstm.py

Expected: the tanh RNN with σ_max = 0.9 is below 0.9^99 ≈ 3e-5 at t = 1 and in practice far lower (its
decay follows ρ(W) ≈ 0.45); the LSTM with forget bias 1 keeps at least 10⁶× more gradient at t = 1 (the
goal of the issue); with forget bias 0 it keeps much less than with 1 (σ(0) = 0.5 against σ(1) = 0.73 per
step on the direct path); the orthogonal RNN decays only through the tanh derivatives. Draws
``docs/figures/gradnorms_lstm.png``.

LSTM cell path from the command line: ``jaxseq gradnorms --cell lstm --forget-bias 1 --steps 100 --hidden 32
--sigma-max 1 --init orthogonal --out runs/gradnorms/lstm`` (recurrent blocks orthogonal, as the cell's init).
"""
from __future__ import annotations

import pathlib
import time

import jax

jax.config.update("jax_enable_x64", True)  # the RNN norms reach 1e-35 at T − t = 99; float32 underflows there
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxseq import cells, gradients, plots  # noqa: E402
from jaxseq.data.synthetic_tasks import adding_problem  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
T, H, SEEDS = 100, 32, 16
MODELS = ("lstm forget bias 1", "lstm forget bias 0", "tanh rnn sigma_max 0.9", "tanh rnn orthogonal")


def one_draw(model: str, key):
    k_p, k_x = jax.random.split(key)
    xs, _ = adding_problem(k_x, 1, T, jnp.float64)
    xs = xs[0]
    if model.startswith("lstm"):
        cell = cells.make_lstm(forget_bias=1.0 if model.endswith("1") else 0.0)
        params = cell.init(k_p, 2, H, jnp.float64)
        carry = cell.init_carry((), H, jnp.float64)
        state = gradients.jacobian_norms(cell.apply, params, carry, xs).spectral
        cell_path = gradients.jacobian_norms(cell.apply, params, carry, xs, wrt="c", of="c").spectral
        direct = jnp.max(gradients.forget_gate_products(gradients.lstm_forget_gates(params, carry, xs)), axis=-1)
        return state, cell_path, direct
    init = "orthogonal" if model.endswith("orthogonal") else "gaussian"
    sigma = 1.0 if init == "orthogonal" else 0.9
    params = gradients.random_params(k_p, "rnn", 2, H, sigma=sigma, init=init, dtype=jnp.float64)
    state = gradients.jacobian_norms(cells.rnn.apply, params, jnp.zeros(H, jnp.float64), xs).spectral
    return state, state, gradients.rnn_upper_bound(params["W"], T)


def band(values):
    return np.median(values, 0), np.percentile(values, 10, 0), np.percentile(values, 90, 0)


def main() -> None:
    keys = jax.random.split(jax.random.PRNGKey(0), SEEDS)
    results = {}
    start = time.perf_counter()
    for model in MODELS:
        results[model] = [np.asarray(a) for a in jax.jit(jax.vmap(lambda k, m=model: one_draw(m, k)))(keys)]
    wall = time.perf_counter() - start
    t1 = 1  # index of s_1 in t = 0 … T
    print(f"T={T}, H={H}, {SEEDS} draws per model (one compiled call each), {wall:.0f} s with compile")
    print(f"{'model':<24}{'median ||ds_T/ds_1||':>22}{'10%':>10}{'90%':>10}{'||dc_T/dc_1||':>15}{'theory':>10}")
    for model, (state, cell_path, theory) in results.items():
        lstm = model.startswith("lstm")
        print(f"{model:<24}{np.median(state[:, t1]):>22.2e}{np.percentile(state[:, t1], 10):>10.2e}"
              f"{np.percentile(state[:, t1], 90):>10.2e}"
              f"{np.median(cell_path[:, t1]) if lstm else float('nan'):>15.2e}{np.median(theory[:, t1]):>10.2e}"
              f"  ({'direct path max prod f' if lstm else 'bound (sigma_max)^(T-t)'})")
    ratio = np.median(results[MODELS[0]][0][:, t1]) / np.median(results[MODELS[2]][0][:, t1])
    print(f"LSTM (forget bias 1) / tanh RNN (sigma_max 0.9) at t = 1, medians: {ratio:.2e} (goal >= 1e6)")
    per_draw = results[MODELS[0]][0][:, t1] / results[MODELS[2]][0][:, t1]
    print(f"  per draw (same seed): min {per_draw.min():.2e}, median {np.median(per_draw):.2e}")

    timesteps = np.arange(T + 1)
    curves = {model: band(results[model][0]) for model in MODELS}
    curves["lstm forget bias 1: cell path ||dc_T/dc_t||"] = band(results[MODELS[0]][1])
    theory = {"lstm forget bias 1: direct path prod f": np.median(results[MODELS[0]][2], 0),
              "lstm forget bias 0: direct path prod f": np.median(results[MODELS[1]][2], 0),
              "tanh rnn sigma_max 0.9: bound 0.9^(T-t)": np.median(results[MODELS[2]][2], 0)}
    plots.plot_gradnorm_bands(timesteps, curves, ROOT / "docs" / "figures" / "gradnorms_lstm.png", theory=theory,
                              xlabel="time step t", ylabel="||ds_T/ds_t||_2 (log scale)",
                              title=f"gradient reaching step t, T={T}, H={H}: median, 10-90% band, {SEEDS} draws")
    print("wrote docs/figures/gradnorms_lstm.png")


if __name__ == "__main__":
    main()
