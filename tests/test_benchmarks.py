"""The GPU benchmark script must work when a GPU is lent (short leases): run it here at a tiny shape."""
import importlib.util
import json
import pathlib
import time

from helpers import import_or_skip

torch = import_or_skip("torch")


def _load(name):
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_lstm_gpu_runs_checks_and_writes_rows(tmp_path, capsys):
    bench = _load("bench_lstm_gpu")
    out = tmp_path / "rows.jsonl"
    assert bench.main(["--configs", "2:5:3:4", "--precisions", "fp32,bf16", "--impls", "fused:u2,scan,cudnn,torch",
                       "--repeats", "1", "--min-sample-s", "0", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    checks = {r["check"]: r["value"] for r in records if "check" in r}
    assert len(checks) == 9 and all(value < 1e-5 for value in checks.values()), checks
    rows = {(r["precision"], r["mode"], r["impl"]) for r in records if "impl" in r}
    assert rows == {(p, m, i) for p in ("fp32", "bf16") for m in ("train", "forward")
                    for i in ("fused:u2", "scan", "cudnn", "torch") if not (p == "bf16" and i == "cudnn")}
    assert "x torch" in capsys.readouterr().out


def _fused_step(T):
    import jax

    from jaxseq import cells, layers

    params = cells.lstm.init(jax.random.PRNGKey(0), 3, 4)
    xs = jax.random.normal(jax.random.PRNGKey(1), (2, T, 3))
    # impl="fused": XLA's loops, whose body thunks run once per step (the kernel is one op per call).
    step = jax.jit(jax.grad(lambda p: layers.lstm(p, xs, impl="fused")[1].sum())).lower(params).compile()
    return lambda: jax.block_until_ready(step(params))


def test_bench_lstm_profile_finds_the_per_step_ops():
    bench = _load("bench_lstm")
    rows = bench.profile_ops(_fused_step(T=5), top=50)
    # The loops' body thunks run once per time step, so some op must show 5 runs per call.
    assert any(runs == 5 for _, _, runs in rows), rows
    assert all(seconds >= 0 for _, seconds, _ in rows)


def test_bench_lstm_reuse_freed_memory_reruns_with_glibc_settings(capfd):
    bench = _load("bench_lstm")
    assert bench.main(["--configs", "2:5:3:4", "--impls", "jaxseq", "--modes", "forward", "--repeats", "1",
                       "--min-sample-s", "0", "--reuse-freed-memory"]) == 0
    out = capfd.readouterr().out
    assert "host memory: glibc keeps freed memory (MALLOC_ARENA_MAX=1" in out and "(2, 5, 3, 4)" in out


def test_bench_lstm_counts_the_input_gradient_only_when_it_is_taken():
    bench = _load("bench_lstm")
    B, T, I, H = 2, 5, 3, 4
    forward = 8 * B * T * H * (I + H)
    assert bench.flops(B, T, I, H, "forward") == forward
    assert bench.flops(B, T, I, H, "train") == 3 * forward
    assert bench.flops(B, T, I, H, "train", params_only=True) == 3 * forward - 8 * B * T * H * I


def test_bench_lstm_pairs_each_round_with_a_gemm(capfd):
    bench = _load("bench_lstm")
    assert bench.main(["--configs", "8:10:16:32", "--impls", "jaxseq", "--modes", "train", "--repeats", "2",
                       "--min-sample-s", "0", "--alternate-s", "0.01"]) == 0
    out = capfd.readouterr().out
    alternating = next(line for line in out.splitlines() if line.startswith("alternating 0.01 s samples at (8, 10"))
    median, spread = alternating.split("jaxseq ")[1].split()
    low, high = (float(v) for v in spread.strip("()").split("-"))
    assert 0 < low <= float(median) <= high, alternating
    assert "paired %" in out and "best %" in out
    row = next(line for line in out.splitlines() if line.startswith("(8, 10, 16, 32)"))
    fields = row.split()  # after the 4-field shape: mode, impl, median, min, GFLOP/s, % peak, paired, best
    paired, best = float(fields[10]), float(fields[11])
    assert 0 < paired < 100 and 0 < best < 100, row
    assert best >= float(fields[9]) - 0.1, row  # the best sample against the same peak as the median's % peak


def test_bench_lstm_sample_leaves_the_settle_calls_untimed():
    bench = _load("bench_lstm")
    calls = []

    def slow_first():  # like a call that meets the previous implementation's threads still spinning
        calls.append(None)
        if len(calls) == 1:
            time.sleep(0.2)

    wall, _ = bench.sample(slow_first, 2, settle=1)
    assert len(calls) == 3 and wall < 0.05, wall
    calls.clear()
    wall, _ = bench.sample(slow_first, 2)
    assert len(calls) == 2 and wall >= 0.1, wall
