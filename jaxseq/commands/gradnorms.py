"""``jaxseq gradnorms``: ‖∂s_T/∂s_t‖ of one random cell at every step, with the theory beside it.

Example::

    jaxseq gradnorms --cell rnn --activation tanh --steps 100 --hidden 32 --sigma-max 0.9 --seed 0 --out runs/g

prints a short table (t, measured, theory) and writes ``runs/g/gradnorms.json`` and ``runs/g/gradnorms.png``.
"""
from __future__ import annotations

import argparse
import math
import pathlib

CELLS = ("linear", "rnn", "lstm", "gru")
INITS = ("gaussian", "orthogonal", "symmetric")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "gradnorms", help="gradient norms across time steps against vanishing/exploding-gradient theory",
        description="Measure ‖∂h_T/∂h_t‖₂ (LSTM: the cell path ‖∂c_T/∂c_t‖₂) of a random cell on N(0, 1) inputs "
                    "for every t, beside the theory: linear ‖W^(T−t)‖₂ (exact), tanh/relu (γ·σ_max(W))^(T−t) "
                    "(upper bound), LSTM Π f / GRU Π z over the steps after t (direct path: the gated self-loop "
                    "alone, without the paths through h and the gates).")
    p.add_argument("--cell", choices=CELLS, default="rnn", help="cell to measure")
    p.add_argument("--activation", choices=("tanh", "relu"), default="tanh", help="rnn activation")
    p.add_argument("--steps", type=int, default=50, help="sequence length T")
    p.add_argument("--hidden", type=int, default=32, help="hidden size H")
    p.add_argument("--sigma-max", type=float, default=0.9,
                   help="largest singular value of each recurrent weight block")
    p.add_argument("--forget-bias", type=float, default=1.0, help="LSTM forget-gate bias at init")
    p.add_argument("--init", choices=INITS, default="gaussian",
                   help="recurrent matrix: gaussian, orthogonal or symmetric, rescaled to --sigma-max")
    p.add_argument("--input-size", type=int, default=1, help="input features, drawn N(0,1)")
    p.add_argument("--method", choices=("auto", "dense", "power"), default="auto",
                   help="dense Jacobians or matrix-free power iteration (auto: dense up to 256 state units)")
    p.add_argument("--float32", action="store_true", help="compute in float32 (default float64: far-apart "
                   "norms such as 1e-40 underflow in float32)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed for weights and inputs")
    p.add_argument("--out", required=True, help="output folder for gradnorms.json and gradnorms.png")
    p.set_defaults(run=run, parser=p)

    def one_line_error(message: str):
        # The issue asks for a one-line error (no usage block), exit code 2 as argparse uses.
        p.exit(2, f"jaxseq gradnorms: error: {message}\n")

    p.error = one_line_error


def _check(args) -> None:
    parser: argparse.ArgumentParser = args.parser
    if args.steps < 1:
        parser.error(f"--steps must be a positive number of time steps, got {args.steps}")
    if args.hidden < 1:
        parser.error(f"--hidden must be positive, got {args.hidden}")
    if args.input_size < 1:
        parser.error(f"--input-size must be positive, got {args.input_size}")
    if not (args.sigma_max > 0 and math.isfinite(args.sigma_max)):
        parser.error(f"--sigma-max must be > 0 and finite, got {args.sigma_max}")
    if not math.isfinite(args.forget_bias):
        parser.error(f"--forget-bias must be a finite number, got {args.forget_bias}")
    out = pathlib.Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {args.out} exists and is not a folder; expected a folder for gradnorms.json and "
                     "gradnorms.png")


def run(args) -> int:
    _check(args)
    import json

    import jax

    import jax.numpy as jnp

    from jaxseq import gradients, plots

    # float64 only inside this computation: a global switch would leak into whatever runs next in the
    # process (the tour runs every command in one process).
    with jax.enable_x64(not args.float32):
        result = gradients.profile(
            args.cell, steps=args.steps, hidden=args.hidden, sigma=args.sigma_max, seed=args.seed,
            activation=args.activation, forget_bias=args.forget_bias, init=args.init, input_size=args.input_size,
            dtype=jnp.float32 if args.float32 else jnp.float64, method=args.method)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gradnorms.json").write_text(json.dumps(result, indent=1) + "\n")
    plots.plot_profile(result, out / "gradnorms.png")

    kind = result["theory_kind"]
    timesteps, measured, theory = result["timesteps"], result["measured"], result["theory"]
    shown = sorted({0, *range(0, args.steps + 1, max(1, args.steps // 10)), args.steps})
    print(f"{'t':>5} {'T-t':>5} {'measured':>12} {'theory':>12}   ({kind}; {result['measured_quantity']})")
    for t in shown:
        print(f"{timesteps[t]:>5} {args.steps - t:>5} {measured[t]:>12.4e} {theory[t]:>12.4e}")
    print(f"wrote {out / 'gradnorms.json'} and {out / 'gradnorms.png'}")
    return 0
