"""Memory-bounded LSTM training: compiled peak memory of the backward pass, and time per step against T.

1. Memory (compile only, no run): ``jax.jit(grad).lower(...).compile().memory_analysis()`` of the training
   step ``grad(sum(ys * r))`` with respect to the LSTM parameters at (B, T, I, H) = (32, 10000, 256, 256),
   for autodiff through a plain ``lax.scan`` (``layers.lstm(impl="scan")``), the fused custom VJP
   (``impl="auto"``: its loops in the native kernel where that is faster, as models run it), and both
   with ``checkpoint="sqrt"`` (segments of ⌈√T⌉ steps). Peak = arguments + outputs + temporaries (XLA's
   buffer assignment; aliasing is not double counted).
2. ``--time``: the same steps timed once at that shape (min of ``--repeats``), so the time cost of the
   checkpoint policy is measured at the shape whose memory it saves.
3. ``--slope``: time per training step of the fused layer (with and without checkpointing) for
   T = 100 … 10000 at (B, I, H) = (32, 128, 128), and a least-squares line ``time = a + slope·T``.

Run: ``.venv/bin/python benchmarks/bench_memory.py [--time] [--slope]``.
Expect: the checkpointed fused step needs well under a quarter of autodiff's peak; times grow linearly in T.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _step(impl, checkpoint, B, T, I, H):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxseq import cells, layers

    params = cells.lstm.init(jax.random.PRNGKey(0), I, H)
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.standard_normal((B, T, I), np.float32))
    r = jnp.asarray(rng.standard_normal((B, T, H), np.float32))

    def loss(p, xs, r):
        return jnp.sum(layers.lstm(p, xs, impl=impl, checkpoint=checkpoint)[1] * r)

    return jax.jit(jax.grad(loss)), (params, xs, r)


VARIANTS = [("scan", None), ("scan", "sqrt"), ("auto", None), ("auto", "sqrt")]


def memory(B, T, I, H):
    print(f"memory analysis at (B, T, I, H) = {(B, T, I, H)}; one [T, B, H] float32 array = "
          f"{T * B * H * 4 / 2**20:.0f} MiB")
    print(f"{'impl':<8} {'checkpoint':<10} {'args MiB':>9} {'out MiB':>8} {'temp MiB':>9} {'peak MiB':>9} "
          f"{'vs scan':>8}")
    peaks = {}
    for impl, ckpt in VARIANTS:
        fn, args = _step(impl, ckpt, B, T, I, H)
        m = fn.lower(*args).compile().memory_analysis()
        peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        peaks[impl, ckpt] = peak
        mib = lambda b: b / 2**20
        print(f"{impl:<8} {str(ckpt):<10} {mib(m.argument_size_in_bytes):9.0f} {mib(m.output_size_in_bytes):8.1f} "
              f"{mib(m.temp_size_in_bytes):9.0f} {mib(peak):9.0f} {peak / peaks['scan', None]:8.3f}")
    return peaks


def _time(fn, args, repeats):
    import jax

    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def timing(B, T, I, H, repeats):
    print(f"\ntraining step time at {(B, T, I, H)} (min of {repeats}), load average {os.getloadavg()}")
    times = {}
    for impl, ckpt in VARIANTS:
        fn, args = _step(impl, ckpt, B, T, I, H)
        times[impl, ckpt] = _time(fn, args, repeats)
        print(f"{impl:<8} {str(ckpt):<10} {times[impl, ckpt]:8.2f} s  {times[impl, ckpt] / times['scan', None]:5.2f}x "
              f"scan  {times[impl, ckpt] / times.get(('auto', None), float('nan')):5.2f}x fused")


def slope(B, I, H, steps, repeats):
    import numpy as np

    print(f"\ntime per training step vs T at (B, I, H) = {(B, I, H)} (min of {repeats}), "
          f"load average {os.getloadavg()}")
    for ckpt in (None, "sqrt"):
        ts = []
        for T in steps:
            fn, args = _step("auto", ckpt, B, T, I, H)
            ts.append(_time(fn, args, repeats))
            print(f"fused checkpoint={ckpt}: T={T:6d} {ts[-1] * 1e3:9.2f} ms  {ts[-1] / T * 1e6:7.1f} µs/step")
        a, intercept = np.polyfit(np.asarray(steps, float), np.asarray(ts), 1)
        fit = intercept + a * np.asarray(steps, float)
        worst = np.max(np.abs(fit - ts) / ts)
        print(f"  slope {a * 1e6:.1f} µs per timestep, intercept {intercept * 1e3:.2f} ms, "
              f"largest relative deviation from the line {100 * worst:.1f}%")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="32:10000:256:256", help="B:T:I:H for the memory (and --time) check")
    p.add_argument("--time", action="store_true", help="also time the four variants at --shape")
    p.add_argument("--slope", action="store_true", help="time per step vs T for the fused layer")
    p.add_argument("--slope-shape", default="32:128:128", help="B:I:H for --slope")
    p.add_argument("--steps", default="100,300,1000,3000,10000", help="T values for --slope")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    B, T, I, H = (int(v) for v in args.shape.split(":"))
    import jax

    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, {os.cpu_count()} logical cores")
    memory(B, T, I, H)
    if args.time:
        timing(B, T, I, H, args.repeats)
    if args.slope:
        b, i, h = (int(v) for v in args.slope_shape.split(":"))
        slope(b, i, h, [int(v) for v in args.steps.split(",")], args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
