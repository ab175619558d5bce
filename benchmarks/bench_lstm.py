"""One LSTM layer, float32: training step (forward + backward) and forward only, jaxseq against its peers.

Peers: torch ``nn.LSTM`` (oneDNN/native CPU kernels, ``--torch-threads`` threads), Flax
``nn.RNN(nn.OptimizedLSTMCell)``, Keras 3 ``LSTM`` on the JAX backend, and jaxseq's plain ``lax.scan`` layer
(``impl="scan"``). All run interleaved in one process: for every configuration each implementation is
compiled and warmed up, then the repeats go round-robin over the implementations, so a load spike from
other processes hits them all alike. Each sample times enough calls to last ``--min-sample-s`` (0.1 s) with
``block_until_ready``, after an untimed one (``--settle-calls``): interleaving puts one runtime's calls right
after another's, whose worker threads may still be spinning on the other core. The table shows the median
and min over ``--repeats`` samples, GFLOP/s from the FLOP count of THEORY.md §3 (forward 8·B·T·H·(I+H),
training step 3× that), the percentage of the peak fp32 matmul rate measured in the same run (the better of a
square JAX and a square torch GEMM), and the ratio of the median to torch's median.

This machine's speed can drift by ±15 % within minutes (a shared VM), and a best-of-run GEMM set against a
median step mixes a fast moment with an ordinary one. So the square GEMMs are also timed before the first round
and after every round, and the "paired %" column is the median over rounds of the step's rate over the
better GEMM rate timed just before or just after that round: the ratio of measurements taken seconds apart.
(A single short GEMM sample that lands in a slow spell would inflate the ratio; taking the better of the two
that bracket the round keeps it conservative.) Every GEMM sample lasts as long as a step's (``--min-sample-s``,
at least 0.05 s): the best of many short samples catches fast spells that a longer one averages out.
"best %" sets the best step sample against the best GEMM sample of the run: the same statistic on both sides.

The training step is ``grad`` of ``sum(ys * r)`` with respect to the layer's parameters and its inputs, for a
fixed random ``r`` — the same loss for every implementation. The input gradient is what a layer inside a
model (over embeddings, or under another layer) must return, and with it the step does the 3× forward FLOPs
it is credited with; ``--params-only`` drops it (and its 8·B·T·H·I FLOPs from the count), as the tables
before 2026-11-29 09:30 UTC did.

Run (quick): ``KERAS_BACKEND=jax .venv/bin/python benchmarks/bench_lstm.py --configs 0 --repeats 3``
Full table:   ``KERAS_BACKEND=jax .venv/bin/python benchmarks/bench_lstm.py``
Expect on a 2-core x86 CPU: the four configs take ~10 minutes at the default 9 repeats.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import NamedTuple

os.environ.setdefault("KERAS_BACKEND", "jax")

CONFIGS = [(64, 34, 200, 256), (128, 100, 256, 512), (32, 500, 64, 128), (1, 100, 128, 256)]
IMPLS = ("jaxseq", "torch", "flax", "keras", "scan")
MODES = ("train", "forward")
# glibc malloc settings that keep freed memory for reuse. XLA:CPU allocates a call's temporaries anew on every
# call; glibc serves a large block from a fresh mmap (always so above 64 MiB on a worker thread's arena) and
# unmaps it on free, so each call page-faults all of it in again: 90 MiB, 23,000 faults and ~55 ms of kernel
# time per training step at (32, 500, 64, 128). One arena, no mmap and no trimming keep the block mapped.
KEEP_FREED_MEMORY = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2 ** 34)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="0,1,2,3",
                   help="comma-separated indices into %s, or B:T:I:H shapes" % (CONFIGS,))
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {IMPLS}; also "
                   "jaxseq-<form> (hoist|step|concat), jaxseq-xla (XLA's loops, not the native CPU kernel), jaxseq-ckpt (checkpoint='sqrt') and jaxseq-dp (batch sharded "
                   "over --cpu-devices devices)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    p.add_argument("--repeats", type=int, default=9, help="timed samples per implementation (median, min)")
    p.add_argument("--min-sample-s", type=float, default=0.1, help="each sample repeats the call to last this long")
    p.add_argument("--settle-calls", type=int, default=1,
                   help="untimed calls before every sample (steps and bracketing GEMMs), so that a sample does not "
                        "time the previous implementation's threads still spinning on the other core: after a "
                        "torch call its OpenMP workers spin on (libgomp's default wait policy), and jaxseq's first "
                        "call then took 1.1-1.3x the time of its next one at (64, 34, 200, 256); 0 times from the "
                        "first call")
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--single-thread", action="store_true",
                   help="run XLA and torch on one thread each (set before jax starts); with the CPU-time column "
                        "this gives comparable figures on a machine shared with other jobs")
    p.add_argument("--cpu-devices", type=int, default=1,
                   help="split the CPU into this many JAX devices (jax_num_cpu_devices); the jaxseq-dp rows shard "
                        "the batch over them, the way jaxseq.training uses several devices")
    p.add_argument("--params-only", action="store_true",
                   help="differentiate the training step with respect to the parameters only, not the inputs "
                        "(the step as timed before 2026-11-29 09:30 UTC; its FLOP count leaves out the input gradient)")
    p.add_argument("--alternate-s", type=float, default=0, metavar="S",
                   help="after each configuration's table, alternate S-second samples of each implementation's "
                        "training step with S-second samples of the square GEMMs (--repeats rounds) and print the "
                        "step's rate over the mean of the two GEMM rates that bracket it (the better GEMM of JAX "
                        "and torch each time), median over rounds: the same sample length and the same statistic "
                        "on both sides")
    p.add_argument("--products", action="store_true",
                   help="also time the step's matrix products alone (recurrent chains and the big GEMMs)")
    p.add_argument("--reuse-freed-memory", action="store_true",
                   help="rerun this script with glibc malloc told to keep freed memory (%s), so that XLA's per-call "
                        "temporary buffers are not mapped and page-faulted in afresh on every call (Linux only)"
                   % " ".join(f"{k}={v}" for k, v in KEEP_FREED_MEMORY.items()))
    p.add_argument("--profile", type=int, default=0, metavar="K",
                   help="after timing, profile each JAX implementation (jax.profiler) and print its K costliest "
                        "ops: exclusive time per call, how often each runs per call, time per run")
    args = p.parse_args(argv)
    configs = []
    for item in args.configs.split(","):
        if ":" in item:
            configs.append(tuple(int(v) for v in item.split(":")))
        else:
            configs.append(CONFIGS[int(item)])
    impls = args.impls.split(",")
    for impl in impls:
        if impl not in IMPLS and not impl.startswith("jaxseq-"):
            p.error(f"--impls: unknown implementation {impl!r}; expected some of {IMPLS}")
    modes = args.modes.split(",")
    if not set(modes) <= set(MODES):
        p.error(f"--modes must be a subset of {MODES}, got {modes}")
    return args, configs, impls, modes


def flops(B, T, I, H, mode, params_only=False):
    """THEORY.md §3: forward 8·B·T·H·(I+H); the training step 3× that, less the input gradient's 8·B·T·H·I."""
    forward = 8 * B * T * H * (I + H)
    if mode == "forward":
        return forward
    return 3 * forward - (8 * B * T * H * I if params_only else 0)


# --------------------------------------------------------------------------------------------------------
# Implementations: each builder returns {mode: zero-argument callable that blocks until done}


def build_jax_family(name, B, T, I, H, modes, params_only):
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((B, T, I), np.float32))
    r = jnp.asarray(rng.standard_normal((B, T, H), np.float32))

    if name.startswith("jaxseq") or name == "scan":
        from jaxseq import cells, layers

        params = cells.lstm.init(jax.random.PRNGKey(0), I, H)
        kwargs = {"impl": "scan"} if name == "scan" else {"impl": "auto"}
        variant = name.split("-", 1)[1] if "-" in name else None
        if variant == "xla":  # the fused layer with XLA's loops instead of the native CPU kernel
            kwargs["impl"] = "fused"
        elif variant == "ckpt":
            kwargs["checkpoint"] = "sqrt"
        elif variant == "dp":  # the batch split over every local device, as jaxseq.training splits it
            from jaxseq.training import make_mesh, put_batch

            batch = put_batch({"x": x, "r": r}, make_mesh())
            x, r = batch["x"], batch["r"]
        elif variant is not None:  # the input product's form, with the loops where "auto" puts them
            kwargs["form"] = variant

        def apply(p, xs):
            return layers.lstm(p, xs, **kwargs)[1]
    elif name == "flax":
        import flax.linen as nn

        model = nn.RNN(nn.OptimizedLSTMCell(H))
        params = model.init(jax.random.PRNGKey(0), x)

        def apply(p, xs):
            return model.apply(p, xs)
    elif name == "keras":
        import keras

        layer = keras.layers.LSTM(H, return_sequences=True)
        layer.build((B, T, I))
        params = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        def apply(p, xs):
            return layer.stateless_call(p, non_trainable, xs)[0]
    else:
        raise ValueError(name)

    def loss(p, xs):
        return jnp.sum(apply(p, xs) * r)

    train = jax.jit(jax.grad(loss, argnums=0 if params_only else (0, 1)))
    forward = jax.jit(apply)
    fns = {}
    if "train" in modes:
        fns["train"] = lambda: jax.block_until_ready(train(params, x))
    if "forward" in modes:
        fns["forward"] = lambda: jax.block_until_ready(forward(params, x))
    return fns


def build_torch(B, T, I, H, modes, params_only):
    import torch

    torch.manual_seed(0)
    lstm = torch.nn.LSTM(I, H, batch_first=True)
    x = torch.randn(B, T, I, requires_grad=not params_only)
    r = torch.randn(B, T, H)

    def train():
        for p in lstm.parameters():
            p.grad = None
        x.grad = None
        out, _ = lstm(x)
        (out * r).sum().backward()

    def forward():
        with torch.inference_mode():
            lstm(x)

    return {m: {"train": train, "forward": forward}[m] for m in modes}


def build(name, config, modes, params_only=False):
    if name == "torch":
        return build_torch(*config, modes, params_only)
    return build_jax_family(name, *config, modes, params_only)


# --------------------------------------------------------------------------------------------------------
# Timing


def calibrate(fn, min_sample_s):
    """Warm up (compile) and pick how many calls one sample needs to last ``min_sample_s``."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    return max(1, int(min_sample_s / max(once, 1e-6)))


def sample(fn, inner, settle=0):
    """Wall-clock seconds per call, and process CPU seconds per call (all threads), after ``settle`` untimed calls."""
    for _ in range(settle):
        fn()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner, (time.process_time() - c0) / inner


GEMM_N = 1024  # the square GEMM whose rate is "peak"


def matmul_fns(torch_threads, n=GEMM_N):
    """Zero-argument callables of a square n×n fp32 GEMM in JAX and in torch (``torch_threads`` threads)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    mm = jax.jit(lambda a: a @ a)
    fns = {"jax": lambda: jax.block_until_ready(mm(a))}
    try:
        import torch

        torch.set_num_threads(torch_threads)
        ta = torch.randn(n, n)
        fns["torch"] = lambda: torch.mm(ta, ta)
    except ImportError:
        pass
    return fns


def peak_matmul(repeats, torch_threads, sample_s=0.05, n=GEMM_N):
    """Best fp32 GFLOP/s of a square n×n GEMM in JAX and in torch (``torch_threads`` threads), over samples
    of about ``sample_s`` seconds."""
    fns = matmul_fns(torch_threads, n)
    inner = {k: calibrate(f, sample_s) for k, f in fns.items()}
    samples = {k: [sample(f, inner[k]) for _ in range(repeats)] for k, f in fns.items()}
    rates = {k: 2 * n ** 3 / min(t[0] for t in ts) / 1e9 for k, ts in samples.items()}
    # Per CPU-second too: the rate one core reaches when it runs, whatever else shares the machine.
    rates.update({f"{k} per cpu-s": 2 * n ** 3 / min(t[1] for t in ts) / 1e9 for k, ts in samples.items()})
    return rates


def product_times(B, T, I, H, repeats):
    """Time the training step's matrix products alone, in JAX (the floor set by the products themselves).

    Chains: T dependent (B, H)·(H, 4H) products (forward recurrence) and T dependent (B, 4H)·(4H, H)
    (backward recurrence); GEMMs over all T·B rows: the input projection, the input gradient, and the weight
    gradient [x, h]ᵀ·δz.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    rng = np.random.default_rng(0)
    f32 = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32) * 0.05)
    W, h0, WT, dz0 = f32(H, 4 * H), f32(B, H), f32(4 * H, H), f32(B, 4 * H)
    X, U, Z, XH = f32(T * B, I), f32(I, 4 * H), f32(T * B, 4 * H), f32(T * B, I + H)

    def chain_fwd(W, h):
        return lax.scan(lambda h, _: ((h @ W)[:, :H], None), h, None, length=T)[0]

    def chain_bwd(WT, d):
        return lax.scan(lambda d, _: (jnp.tile(d @ WT, (1, 4)), None), d, None, length=T)[0]

    parts = {
        "fwd chain": (jax.jit(chain_fwd), (W, h0)),
        "bwd chain": (jax.jit(chain_bwd), (WT, dz0)),
        "input GEMM": (jax.jit(lambda X, U: X @ U), (X, U)),
        "dX GEMM": (jax.jit(lambda Z, U: Z @ U.T), (Z, U)),
        "dW GEMM": (jax.jit(lambda XH, Z: XH.T @ Z), (XH, Z)),
    }
    out = {}
    for name, (f, a) in parts.items():
        fn = lambda f=f, a=a: jax.block_until_ready(f(*a))
        inner = calibrate(fn, 0.05)
        out[name] = min(sample(fn, inner)[0] for _ in range(repeats))
    return out


def profile_ops(fn, top, calls=3):
    """Where one call's time goes: ``[(op name, exclusive seconds per call, runs per call)]``, costliest first.

    Runs ``fn`` ``calls`` times under ``jax.profiler.trace`` and reads the trace back. On a GPU the device's
    kernel events count; on the CPU, XLA's thunks on its worker threads (a loop's body thunks nest inside the
    loop's event, so times are exclusive: a loop's own row is its overhead beyond the thunks it ran).
    """
    import glob
    import tempfile

    import jax
    from jax.profiler import ProfileData

    fn()  # compiled and warm before tracing
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(calls):
                fn()
        data = ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])
        planes = list(data.planes)
    device_planes = [plane for plane in planes if plane.name.startswith("/device:GPU")]
    if device_planes:
        lines = [line for plane in device_planes for line in plane.lines if line.name != "XLA Modules"]
    else:
        lines = [line for plane in planes for line in plane.lines if line.name.startswith("tf_XLA")]
    exclusive, runs = {}, {}
    for line in lines:
        events = sorted(((e.start_ns, e.duration_ns, e.name) for e in line.events), key=lambda e: (e[0], -e[1]))
        stack = []  # open events: [end, name, time left after the nested events]
        for start, duration, name in events:
            while stack and stack[-1][0] <= start:
                _, done, own = stack.pop()
                exclusive[done] = exclusive.get(done, 0) + own
            if stack:
                stack[-1][2] -= duration
            stack.append([start + duration, name, duration])
            runs[name] = runs.get(name, 0) + 1
        for _, done, own in stack:
            exclusive[done] = exclusive.get(done, 0) + own
    rows = [(name, ns / calls / 1e9, runs[name] / calls) for name, ns in exclusive.items()
            if not name.startswith("ThunkExecutor")]
    return sorted(rows, key=lambda row: -row[1])[:top]


def print_profile(config, mode, impl, rows, wall):
    print(f"\nprofile of {impl} {mode} at {config} (timed wall {wall * 1e3:.2f} ms per call; under the profiler "
          "ops run slower, so compare ops with each other):")
    print(f"  {'op':<48} {'ms/call':>9} {'% wall':>7} {'runs/call':>10} {'us/run':>9}")
    for name, seconds, runs in rows:
        print(f"  {name[:48]:<48} {seconds * 1e3:9.2f} {100 * seconds / wall:7.1f} {runs:10.0f} "
              f"{1e6 * seconds / max(runs, 1):9.1f}")


def alternate(config, steps, gemms, seconds, rounds, params_only):
    """Print each training step's rate over the GEMM rate around it, from samples of ``seconds`` each."""
    inner = {fn: calibrate(fn, seconds) for fn in (*steps.values(), *gemms.values())}

    def rate(fn, work):  # GFLOP/s over one sample of about `seconds`, after a settle call
        return work / sample(fn, inner[fn], settle=1)[0] / 1e9

    def gemm_rate():
        return max(rate(fn, 2 * GEMM_N ** 3) for fn in gemms.values())

    f = flops(*config, "train", params_only)
    ratios = {impl: [] for impl in steps}
    before = gemm_rate()
    for _ in range(rounds):
        for impl, fn in steps.items():
            step = rate(fn, f)
            after = gemm_rate()
            ratios[impl].append(step / ((before + after) / 2))
            before = after
    print(f"alternating {seconds:g} s samples at {config}, training step over the GEMM rate around it (median, "
          "range over rounds): " + "; ".join(f"{impl} {statistics.median(r):.3f} ({min(r):.3f}-{max(r):.3f})"
                                           for impl, r in ratios.items()), flush=True)


class Row(NamedTuple):
    """One timed implementation: median, min and median CPU seconds per call; paired: fraction of peak."""
    config: tuple
    mode: str
    impl: str
    flops: int
    median: float
    min: float
    cpu: float
    paired: float


def print_rows(results, peak, header):
    """Print one configuration's rows as soon as it is done (long runs on a shared machine get cut short)."""
    if header:
        print("GFLOP/s and % peak from the median wall time; 'x torch' = median / torch's median (wall and CPU);")
        print("cpu ms = process CPU time per call over all threads (less sensitive to other processes' load).")
        print("cpu GFLOP/s = FLOPs / cpu time; its % peak uses the best matmul rate per cpu-second.")
        print("paired % = median over rounds of the step's rate over the better GEMM rate timed just before or after "
              "the round; best % = the best step sample over the best GEMM sample of the run.")
        print(f"{'(B, T, I, H)':<22} {'mode':<8} {'impl':<14} {'median ms':>10} {'min ms':>9} {'GFLOP/s':>8} "
              f"{'% peak':>7} {'paired %':>8} {'best %':>7} {'x torch':>8} {'cpu ms':>9} {'cpu x torch':>11} "
              f"{'cpu GFLOP/s':>11} {'% peak':>7}")
    peak_best = max(v for k, v in peak.items() if "cpu" not in k)
    peak_cpu = max((v for k, v in peak.items() if "cpu" in k), default=float("nan"))
    medians = {(row.config, row.mode, row.impl): (row.median, row.cpu) for row in results}
    for row in results:
        config, mode, impl, med, cpu = row.config, row.mode, row.impl, row.median, row.cpu
        f = row.flops
        ref = medians.get((config, mode, "torch")) or medians.get((config, "train", "torch"))
        ratio = f"{med / ref[0]:8.2f}" if ref else f"{'-':>8}"
        cpu_ratio = f"{cpu / ref[1]:11.2f}" if ref and mode != "products" else f"{'-':>11}"
        print(f"{str(config):<22} {mode:<8} {impl:<14} {med * 1e3:10.2f} {row.min * 1e3:9.2f} "
              f"{f / med / 1e9:8.1f} {100 * f / med / 1e9 / peak_best:7.1f} {100 * row.paired:8.1f} "
              f"{100 * f / row.min / 1e9 / peak_best:7.1f} {ratio} "
              f"{cpu * 1e3:9.2f} {cpu_ratio} {f / cpu / 1e9:11.1f} {100 * f / cpu / 1e9 / peak_cpu:7.1f}", flush=True)


def versions():
    out = {"python": platform.python_version()}
    for mod in ("jax", "jaxlib", "flax", "keras", "torch", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = "not installed"
    return out


def cpu_model():
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def main(argv=None) -> int:
    args, configs, impls, modes = parse_args(argv)
    if args.reuse_freed_memory and any(os.environ.get(k) != v for k, v in KEEP_FREED_MEMORY.items()):
        # glibc reads these when the process starts, and JAX's threads pick their arenas early: a new process.
        command = [sys.executable, os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(command, env={**os.environ, **KEEP_FREED_MEMORY}).returncode
    if args.single_thread:
        # XLA:CPU (jax 0.10) ignores --xla_cpu_multi_thread_eigen / intra_op_parallelism_threads and sizes its
        # thread pool by the CPUs the process may run on: pin the process to one core before jax starts.
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        args.torch_threads = 1
    import jax

    if args.cpu_devices > 1:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if "torch" in impls:
        import torch

        torch.set_num_threads(args.torch_threads)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), CPU {cpu_model()}, "
          f"{os.cpu_count()} logical cores, load average {os.getloadavg()}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    if any(impl == "jaxseq" or impl.startswith("jaxseq-") for impl in impls):
        from jaxseq import native

        lanes = native.vector_lanes() if native.available() else None
        print(f"native CPU kernel: {f'{lanes}-float vectors' if lanes else 'off (XLA loops)'}")
    print(f"torch threads {args.torch_threads}; JAX devices {jax.device_count()}; repeats {args.repeats}; "
          f"impls {impls}; modes {modes}")
    kept = all(os.environ.get(k) == v for k, v in KEEP_FREED_MEMORY.items())
    print("host memory: " + ("glibc keeps freed memory (" + " ".join(f"{k}={v}" for k, v in KEEP_FREED_MEMORY.items())
                             + ")" if kept else "default malloc (see --reuse-freed-memory)"))
    gemm_sample_s = max(args.min_sample_s, 0.05)
    peak = peak_matmul(args.repeats, args.torch_threads, gemm_sample_s)
    print("peak fp32 matmul (1024², best of repeats, per wall-s and per cpu-s): "
          + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peak.items()))

    gemms = matmul_fns(args.torch_threads)
    gemm_inner = {k: calibrate(f, gemm_sample_s) for k, f in gemms.items()}

    def gemm_rate():  # the better of the square GEMMs' rates now, GFLOP/s
        return max(2 * GEMM_N ** 3 / sample(f, gemm_inner[k], args.settle_calls)[0] / 1e9 for k, f in gemms.items())

    results = []
    for config in configs:
        B, T, I, H = config
        fns = {}
        for impl in impls:
            for mode, fn in build(impl, config, modes, args.params_only).items():
                fns[(mode, impl)] = fn
        inner = {k: calibrate(fn, args.min_sample_s) for k, fn in fns.items()}
        times = {k: [] for k in fns}
        gemm_rates = [gemm_rate()]  # before the first round, then after each
        for _ in range(args.repeats):
            for k, fn in fns.items():  # round-robin: every implementation once per round
                times[k].append(sample(fn, inner[k], args.settle_calls))
            gemm_rates.append(gemm_rate())
        bracketing = [max(before, after) for before, after in zip(gemm_rates, gemm_rates[1:])]
        for (mode, impl), ts in times.items():
            wall, cpu = [t[0] for t in ts], [t[1] for t in ts]
            f = flops(*config, mode, args.params_only)
            paired = statistics.median(f / t / 1e9 / rate for t, rate in zip(wall, bracketing))
            results.append(Row(config, mode, impl, f, statistics.median(wall), min(wall), statistics.median(cpu),
                               paired))
        if args.products and "train" in modes:
            parts = product_times(B, T, I, H, args.repeats)
            total = sum(parts.values())
            print(f"products alone at {config}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in parts.items())
                  + f"; sum {total * 1e3:.2f} ms")
            results.append(Row(config, "products", "sum", flops(*config, "train"), total, total, float("nan"),
                               float("nan")))
        print_rows([row for row in results if row.config == config], peak, header=config == configs[0])
        if args.alternate_s > 0 and "train" in modes:
            alternate(config, {impl: fn for (mode, impl), fn in fns.items() if mode == "train"}, gemms,
                      args.alternate_s, args.repeats, args.params_only)
        if args.profile:
            medians = {(row.mode, row.impl): row.median for row in results if row.config == config}
            for (mode, impl), fn in fns.items():
                if impl != "torch":
                    print_profile(config, mode, impl, profile_ops(fn, args.profile), medians[(mode, impl)])
        del fns
        if len(configs) > 1:
            # Re-measure the peak between configurations and keep the best: on a shared machine one measurement
            # can land in a slow spell and make every "% peak" too high (the final table uses the best).
            again = peak_matmul(args.repeats, args.torch_threads, gemm_sample_s)
            peak = {k: max(v, again.get(k, v)) for k, v in peak.items()}
    if len(configs) > 1:
        print("\nall rows again, % peak against the best matmul rate measured during the run: "
              + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peak.items()))
        print_rows(results, peak, header=True)
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
