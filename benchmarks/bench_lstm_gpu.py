"""One LSTM layer on a CUDA GPU: jaxseq's scan, fused and cuDNN paths against torch ``nn.LSTM`` (cuDNN).

The GPU counterpart of ``bench_lstm.py``, written to fit one short lease of a lent GPU: it checks before it
times, writes every row as soon as it is measured (``--out``), and stops starting new configurations once
``--budget-s`` is spent.

1. Checks (strict float32): on a small batch with ragged lengths, ``impl="scan"``, ``"fused"`` and ``"cudnn"``
   agree in outputs and parameter gradients, and the cuDNN path's outputs equal torch ``nn.LSTM``'s with the
   same weights (``jaxseq.interop.lstm_to_torch``).
2. Peak matmul rates (torch, 8192²) in the three precisions, for the "% peak" column.
3. Timings at the four configurations of the issue, training step (grad of ``sum(ys * r)`` w.r.t. the
   parameters) and forward only, in three precisions:

   * ``fp32``: strict float32 on both sides (``jax.default_matmul_precision("highest")``,
     ``torch.backends.cudnn.allow_tf32 = False``);
   * ``tf32``: each framework's default for float32 on Ampere and later (both let the tensor cores round the
     products' inputs to TF32);
   * ``bf16``: parameters and inputs in bfloat16. ``jax.experimental.rnn`` has no bfloat16 LSTM, so jaxseq's
     cuDNN path is not run there (``impl="auto"`` picks the fused path).

   Samples go round-robin over the implementations; the table shows the median (and min) per call and the
   ratio to torch's median in the same precision.

Run: ``python benchmarks/bench_lstm_gpu.py --out results.jsonl`` (155 s on an H200). A jaxseq impl may name
its steps per loop iteration: ``--impls fused:u1,fused:u4,fused,torch`` (plain ``fused`` uses the layer's
default, 16 on GPU). ``benchmarks/lstm_gpu_h200.jsonl`` holds the rows of RESULTS.md's GPU section.
On a CPU it runs too, for trying the script: ``--configs 2:5:3:4 --precisions fp32 --repeats 2``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import traceback

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(_HERE, ".."), _HERE]  # jaxseq from this checkout; bench_lstm beside this file

from bench_lstm import CONFIGS, flops  # noqa: E402 - the CPU benchmark's shapes and FLOP count

PRECISIONS = ("fp32", "tf32", "bf16")
IMPLS = ("scan", "fused", "cudnn", "torch")
MODES = ("train", "forward")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="0,1,2,3", help=f"indices into {CONFIGS}, or B:T:I:H shapes")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help=f"subset of {PRECISIONS}")
    p.add_argument("--impls", default=",".join(IMPLS),
                   help=f"subset of {IMPLS}; a jaxseq impl may end in :uN for unroll=N (e.g. fused:u1; default: "
                        "the layer's own, 16 on GPU)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--min-sample-s", type=float, default=0.02)
    p.add_argument("--budget-s", type=float, default=300.0, help="start no new configuration after this")
    p.add_argument("--out", default=None, help="append one JSON line per measured row here")
    p.add_argument("--skip-checks", action="store_true")
    args = p.parse_args(argv)
    args.configs = [tuple(int(v) for v in c.split(":")) if ":" in c else CONFIGS[int(c)]
                    for c in args.configs.split(",")]
    args.precisions = args.precisions.split(",")
    args.impls = args.impls.split(",")
    impl_names = [impl.split(":u")[0] for impl in args.impls]
    for name, got, allowed in (("precisions", args.precisions, PRECISIONS), ("impls", impl_names, IMPLS)):
        if not set(got) <= set(allowed):
            p.error(f"--{name} must be a subset of {allowed}, got {got}")
    return args


@contextlib.contextmanager
def precision_scope(precision):
    """Set both frameworks' float32 matmul precision for ``precision`` (see the module docstring)."""
    import jax
    import torch

    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
    scope = jax.default_matmul_precision("highest") if precision == "fp32" else contextlib.nullcontext()
    try:
        with scope:
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def synchronize():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------------
# Implementations: each returns {mode: zero-argument callable that waits for its result}


def inputs(B, T, I, H):
    """Float32 params (jaxseq layout), inputs ``[B, T, I]`` and loss weights ``r`` ``[B, T, H]``."""
    import jax
    import numpy as np

    from jaxseq import cells

    rng = np.random.default_rng(0)
    params = cells.lstm.init(jax.random.PRNGKey(0), I, H)
    x = rng.standard_normal((B, T, I)).astype(np.float32)
    r = rng.standard_normal((B, T, H)).astype(np.float32)
    return params, x, r


def build_jaxseq(impl, config, precision, modes):
    import jax
    import jax.numpy as jnp

    from jaxseq import layers

    params, x, r = inputs(*config)
    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)
    x, r = jnp.asarray(x, dtype), jnp.asarray(r, dtype)

    impl, _, unroll = impl.partition(":u")

    def apply(p, xs):
        return layers.lstm(p, xs, impl=impl, unroll=int(unroll) if unroll else None)[1]

    def loss(p, xs):
        return jnp.sum((apply(p, xs) * r).astype(jnp.float32))

    train, forward = jax.jit(jax.grad(loss)), jax.jit(apply)
    fns = {"train": lambda: train(params, x), "forward": lambda: forward(params, x)}
    return {m: fns[m] for m in modes}, lambda out: jax.block_until_ready(out)


def build_torch(config, precision, modes):
    import torch

    from jaxseq import interop

    params, x, r = inputs(*config)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lstm = interop.lstm_to_torch(params).to(device=device, dtype=dtype)
    lstm.flatten_parameters()  # one contiguous weight buffer for cuDNN, as after torch's own .to()/.cuda()
    x = torch.tensor(x, device=device, dtype=dtype)
    r = torch.tensor(r, device=device, dtype=dtype)
    weights = list(lstm.parameters())

    def train():
        out, _ = lstm(x)
        return torch.autograd.grad((out * r).float().sum(), weights)

    def forward():
        with torch.inference_mode():
            return lstm(x)[0]

    fns = {"train": train, "forward": forward}
    return {m: fns[m] for m in modes}, lambda out: synchronize()


# --------------------------------------------------------------------------------------------------------
# Checks and timing


def checks():
    """Strict-float32 agreement of the three jaxseq paths and torch, on ragged lengths; returns the diffs."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from jaxseq import cells, interop, layers

    B, T, I, H = 5, 9, 6, 8
    params = cells.lstm.init(jax.random.PRNGKey(1), I, H)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((B, T, I)), jnp.float32)
    r = jnp.asarray(rng.standard_normal((B, T, H)), jnp.float32)
    lengths = jnp.asarray([9, 4, 1, 7, 9], jnp.int32)
    out = {}
    with precision_scope("fp32"):
        def value_and_grad(impl, reverse):
            def loss(p):
                final, ys = layers.lstm(p, x, lengths=lengths, reverse=reverse, impl=impl)
                return jnp.sum(ys * r) + jnp.sum(final.h) + jnp.sum(final.c ** 2), ys
            (value, ys), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
            return ys, grads

        for reverse in (False, True):
            ref_ys, ref_grads = value_and_grad("scan", reverse)
            for impl in ("fused", "cudnn"):
                ys, grads = value_and_grad(impl, reverse)
                out[f"{impl} vs scan, reverse={reverse}: max |Δys|"] = float(jnp.max(jnp.abs(ys - ref_ys)))
                out[f"{impl} vs scan, reverse={reverse}: max |Δgrad| / max |grad|"] = max(
                    float(jnp.max(jnp.abs(grads[k] - ref_grads[k])) / jnp.max(jnp.abs(ref_grads[k])))
                    for k in ref_grads)
        full_ys = layers.lstm(params, x, impl="cudnn")[1]
        module = interop.lstm_to_torch(params).to("cuda" if torch.cuda.is_available() else "cpu")
        with torch.no_grad():
            torch_ys = module(torch.tensor(np.asarray(x), device=next(module.parameters()).device))[0]
        out["cudnn vs torch nn.LSTM: max |Δys|"] = float(np.max(np.abs(np.asarray(full_ys) - torch_ys.cpu().numpy())))
    return out


def peak_rates(n=8192):
    """TFLOP/s of an n³ torch matmul on random data in each precision (median of 10 after warm-up)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    rates = {}
    for precision in PRECISIONS:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        with precision_scope(precision):
            for _ in range(3):
                a @ a
            synchronize()
            times = []
            for _ in range(10):
                t0 = time.perf_counter()
                a @ a
                synchronize()
                times.append(time.perf_counter() - t0)
        rates[precision] = 2 * n ** 3 / statistics.median(times) / 1e12
    return rates


def calibrate(fn, wait, min_sample_s):
    wait(fn())  # compile / build plans
    t0 = time.perf_counter()
    wait(fn())
    once = time.perf_counter() - t0
    return max(1, int(min_sample_s / max(once, 1e-6)))


def sample(fn, wait, inner):
    t0 = time.perf_counter()
    out = None
    for _ in range(inner):
        out = fn()
    wait(out)
    return (time.perf_counter() - t0) / inner


def time_config(config, precision, impls, modes, args):
    """Round-robin timing of every (mode, impl) at one configuration and precision: a list of row dicts."""
    fns = {}
    with precision_scope(precision):
        for impl in impls:
            if impl == "cudnn" and precision == "bf16":
                continue  # jax.experimental.rnn has no bfloat16 LSTM; "auto" runs the fused path there
            try:
                built, wait = (build_torch(config, precision, modes) if impl == "torch"
                               else build_jaxseq(impl, config, precision, modes))
                for mode, fn in built.items():
                    fns[(mode, impl)] = (fn, wait, calibrate(fn, wait, args.min_sample_s))
            except Exception:  # noqa: BLE001 - report and go on: one failing path must not lose the others
                print(f"{config} {precision} {impl}: FAILED\n{traceback.format_exc()}", flush=True)
        times = {k: [] for k in fns}
        for _ in range(args.repeats):
            for k, (fn, wait, inner) in fns.items():
                times[k].append(sample(fn, wait, inner))
    rows = []
    for (mode, impl), ts in times.items():
        rows.append(dict(config=list(config), precision=precision, mode=mode, impl=impl,
                         median_ms=statistics.median(ts) * 1e3, min_ms=min(ts) * 1e3))
    for row in rows:
        ref = next((o for o in rows if o["impl"] == "torch" and o["mode"] == row["mode"]), None)
        row["x_torch"] = row["median_ms"] / ref["median_ms"] if ref else None
        # This step differentiates the parameters only: no input gradient in its FLOP count.
        row["tflops"] = flops(*config, row["mode"], params_only=True) / (row["median_ms"] / 1e3) / 1e12
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    import jax
    import jaxlib
    import torch

    import jaxseq

    device = jax.devices()[0]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device for torch"
    print(f"jax device: {device.device_kind} ({jax.default_backend()}); torch device: {gpu}")
    print(f"versions: jax {jax.__version__}, jaxlib {jaxlib.__version__}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, jaxseq {jaxseq.__version__}",
          flush=True)
    out = open(args.out, "a") if args.out else None  # noqa: SIM115 - rows are appended as they come

    def record(row):
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()

    if not args.skip_checks:
        try:
            for name, value in checks().items():
                print(f"check  {name}: {value:.2e}", flush=True)
                record(dict(check=name, value=value))
        except Exception:  # noqa: BLE001
            print(f"checks FAILED\n{traceback.format_exc()}", flush=True)
    peaks = peak_rates()
    print("peak matmul (torch, 8192², TFLOP/s): " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()), flush=True)
    record(dict(peaks=peaks, device=gpu))

    rows = []
    for precision in args.precisions:
        for config in args.configs:
            if time.perf_counter() - start > args.budget_s:
                print(f"budget of {args.budget_s:.0f} s spent: skipping {precision} {config}", flush=True)
                continue
            new = time_config(config, precision, args.impls, MODES, args)
            for row in new:
                row["device"] = gpu
                record(row)
            rows += new
            print(f"done {precision} {config} at {time.perf_counter() - start:.0f} s", flush=True)

    print(f"\n{'(B, T, I, H)':<22} {'prec':<5} {'mode':<8} {'impl':<9} {'median ms':>10} {'min ms':>9} "
          f"{'TFLOP/s':>8} {'% peak':>7} {'x torch':>8}")
    for row in sorted(rows, key=lambda o: (o["precision"], str(o["config"]), o["mode"], o["impl"])):
        peak = peaks.get(row["precision"])
        pct = f"{100 * row['tflops'] / peak:7.2f}" if peak else f"{'-':>7}"
        ratio = f"{row['x_torch']:8.2f}" if row["x_torch"] else f"{'-':>8}"
        print(f"{str(tuple(row['config'])):<22} {row['precision']:<5} {row['mode']:<8} {row['impl']:<9} "
              f"{row['median_ms']:10.3f} {row['min_ms']:9.3f} {row['tflops']:8.2f} {pct} {ratio}")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
