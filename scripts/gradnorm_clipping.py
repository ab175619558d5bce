"""Experiment 5: the exploding regime, with and without Pascanu's gradient-norm clipping.

A tanh RNN (H = 32) whose recurrent matrix starts with σ_max ∈ {1.5, 2, 3} (Gaussian, rescaled) is trained
on the adding problem at T = 50 with plain SGD (lr 0.05, batch 50, 300 steps) — once as is and once with
``optax.clip_by_global_norm(1.0)`` (Pascanu et al. 2013, Alg. 1, threshold 1) — for seeds 0, 1, 2. Logs
the training loss and the global gradient norm before clipping at every step, and the per-step profile
‖∂L/∂h_t‖ at initialisation (one backward pass, ``jaxseq.gradients.carry_grads``).

Run (about 10 minutes on 2 shared CPU cores)::

    .venv/bin/python scripts/gradnorm_clipping.py

Expected: at σ_max = 3 the unclipped run's gradient norm spikes by orders of magnitude and the loss goes to
inf/NaN within a few dozen steps; the clipped run stays finite and settles at the mean-predictor MSE ≈ 0.167
(clipping cures the explosion, not the vanishing that keeps the tanh RNN from solving the task). At
σ_max = 1.5 both runs behave alike: σ_max > 1 makes explosion possible, not certain. Draws
``docs/figures/gradnorms_clipping_loss.png`` and ``docs/figures/gradnorms_clipping_gradnorm.png`` (seed 0).
"""
from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from gradnorm_adding import train  # noqa: E402  (the same training loop as experiment 4)

from jaxseq import plots  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
T, STEPS, LR = 50, 300, 0.05
SIGMAS = (1.5, 2.0, 3.0)
SEEDS = (0, 1, 2)


def main() -> None:
    runs = []
    print(f"tanh RNN, adding T={T}, SGD lr {LR}, {STEPS} steps")
    print(f"{'sigma_max':>9}{'clip':>6}{'seed':>5}{'non-finite steps':>18}{'first':>7}{'max grad norm':>15}"
          f"{'median':>9}{'final eval MSE':>16}{'||dL/dh_1||/||dL/dh_T|| at init':>33}")
    for sigma in SIGMAS:
        for clip in (None, 1.0):
            for seed in SEEDS:
                run = train("adding", "rnn", T, optimizer="sgd", learning_rate=LR, clip=clip, sigma=sigma,
                            max_steps=STEPS, budget_s=float("inf"), eval_every=50, seed=seed,
                            stop_when_solved=False)
                runs.append(run)
                h = run["history"]
                loss, grad = np.asarray(h["loss"]), np.asarray(h["grad_norm"])
                bad = ~np.isfinite(loss) | ~np.isfinite(grad)
                profile = np.asarray(h["profile_start"])
                print(f"{sigma:>9}{str(clip):>6}{seed:>5}{int(bad.sum()):>18}"
                      f"{(str(int(np.argmax(bad))) if bad.any() else '-'):>7}{np.nanmax(grad):>15.3g}"
                      f"{np.nanmedian(grad):>9.3g}{run['final_eval']:>16.4g}{profile[0] / profile[-1]:>33.3g}",
                      flush=True)

    out = ROOT / "runs" / "gradnorms"
    out.mkdir(parents=True, exist_ok=True)
    (out / "clipping.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "wall_s"} for r in runs]))
    shown = [r for r in runs if r["seed"] == 0]
    label = lambda r: f"sigma_max {r['sigma']}, {'clip 1.0' if r['clip'] else 'no clipping'}"  # noqa: E731
    figures = ROOT / "docs" / "figures"
    plots.plot_training_runs({label(r): (np.arange(len(r["history"]["loss"])), r["history"]["loss"]) for r in shown},
                             figures / "gradnorms_clipping_loss.png", metric="training MSE", baseline=1 / 6,
                             title=f"tanh RNN on adding T={T}, SGD lr {LR}: loss (inf/NaN not drawn)")
    plots.plot_training_runs({label(r): (np.arange(len(r["history"]["grad_norm"])), r["history"]["grad_norm"])
                              for r in shown}, figures / "gradnorms_clipping_gradnorm.png",
                             metric="global gradient norm before clipping",
                             title="gradient norm per step (clipping threshold 1.0)")
    print("wrote docs/figures/gradnorms_clipping_loss.png and gradnorms_clipping_gradnorm.png")


if __name__ == "__main__":
    main()
