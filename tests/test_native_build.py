"""Building the native kernel (jaxseq.native.build): failures are one logged line and never an error, one build
across processes, damaged caches rebuilt, the narrower vector widths, and `jaxseq native`."""
import logging
import os
import pathlib
import stat
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from helpers import assert_trees_close

from jaxseq import cells, cli, native, unroll
from jaxseq.cells import LSTMState
from jaxseq.native import build

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_library(monkeypatch):
    """``native.reset()`` forgets the build result before and after the test (the settings change in between)."""
    native.reset()
    yield
    monkeypatch.undo()
    native.reset()


@pytest.fixture
def fresh_process():
    """As in a new process: once a library is registered, a later one is not loaded (XLA keeps the first)."""
    with native.as_in_a_fresh_process():
        yield


@pytest.fixture(scope="module")
def real_library() -> pathlib.Path:
    """The kernel as this machine builds it (from the user's cache): what the fake compilers below copy."""
    try:
        return build.ensure_built()
    except build.BuildError as error:
        pytest.skip(f"the native kernel cannot be built here: {error}")


def _fake_compiler(folder: pathlib.Path, body: str) -> pathlib.Path:
    """A CXX that appends a line to ``folder/compiles.log`` per call, then runs ``body`` with ``$out``, the
    path after ``-o``."""
    script = folder / "fake-cxx"
    script.write_text(f"""#!/bin/sh
echo "$$" >> "{folder}/compiles.log"
out=""; previous=""
for arg in "$@"; do [ "$previous" = "-o" ] && out="$arg"; previous="$arg"; done
{body}
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def _compiles(folder: pathlib.Path) -> int:
    log = folder / "compiles.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def _jaxseq_records(caplog):
    return [r for r in caplog.records if r.name.startswith("jaxseq")]


@pytest.mark.parametrize("case,expected", [
    ("no compiler", "no C++ compiler (/nonexistent) found"),
    ("cache below a file", "cannot write the native kernel's cache"),
    ("not Linux", "needs x86-64 Linux, this is Darwin"),
    ("not x86", "needs x86-64 Linux, this is Linux aarch64"),
    ("unknown ISA", "JAXSEQ_NATIVE_ISA='avx3' is not one of native, avx2, sse"),
    ("compiler fails", "building the native LSTM kernel failed (/bin/false exited with 1"),
    ("compiler cannot run", "could not run the C++ compiler"),
    ("no home folder", "no home folder for the native kernel's cache; set JAXSEQ_CACHE_DIR"),
    ("library does not load", "could not be loaded (OSError"),
])
def test_every_failure_is_one_logged_line_and_no_error(case, expected, monkeypatch, tmp_path, caplog,
                                                       fresh_library, fresh_process):
    monkeypatch.setenv("JAXSEQ_CACHE_DIR", str(tmp_path / "cache"))
    if case == "no compiler":
        monkeypatch.setenv("CXX", "/nonexistent")
    elif case == "cache below a file":  # we may run as root, whom a read-only folder does not stop
        (tmp_path / "file").write_text("")
        monkeypatch.setenv("JAXSEQ_CACHE_DIR", str(tmp_path / "file" / "cache"))
    elif case == "not Linux":
        monkeypatch.setattr(build.platform, "system", lambda: "Darwin")
    elif case == "not x86":
        monkeypatch.setattr(build.platform, "machine", lambda: "aarch64")
    elif case == "unknown ISA":
        monkeypatch.setenv("JAXSEQ_NATIVE_ISA", "avx3")
    elif case == "compiler fails":
        monkeypatch.setenv("CXX", "/bin/false")
    elif case == "compiler cannot run":  # executable, but neither a binary nor a script with #!
        (tmp_path / "cxx").write_bytes(b"\x00\x01garbage")
        (tmp_path / "cxx").chmod(0o755)
        monkeypatch.setenv("CXX", str(tmp_path / "cxx"))
    elif case == "no home folder":
        monkeypatch.delenv("JAXSEQ_CACHE_DIR")
        monkeypatch.setattr(build.Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError())))
    else:  # a "library" that builds, and matches its checksum, but is no shared object
        monkeypatch.setenv("CXX", str(_fake_compiler(tmp_path, 'echo "not an ELF file" > "$out"')))
    with caplog.at_level(logging.INFO, logger="jaxseq"):
        assert native.available() is False
        assert native.vector_lanes() is None
    messages = [r.getMessage() for r in _jaxseq_records(caplog)]
    failures = [m for m in messages if "uses XLA's loops" in m]
    assert len(failures) == 1, messages
    # The only other line: that it builds, where a compiler ran.
    assert len(messages) == 1 + (case in ("compiler fails", "compiler cannot run", "library does not load")), messages
    assert expected in failures[0] and "\n" not in failures[0] and "XLA's loops" in failures[0]
    assert expected in native.unavailable_reason()
    if case != "library does not load":
        assert _compiles(tmp_path) == 0 and not list((tmp_path / "cache").glob("native/*.so"))


def test_no_compile_is_tried_off_linux(monkeypatch, tmp_path, fresh_library):
    monkeypatch.setattr(build.platform, "system", lambda: "Windows")
    monkeypatch.setenv("CXX", str(_fake_compiler(tmp_path, "exit 1")))
    monkeypatch.setenv("JAXSEQ_CACHE_DIR", str(tmp_path / "cache"))
    assert not native.available()
    assert _compiles(tmp_path) == 0 and not (tmp_path / "cache").exists()


def test_a_second_library_in_one_process_keeps_the_first(real_library, monkeypatch, tmp_path, caplog,
                                                          fresh_library):
    """XLA refuses a second handler under the kernel's names (an error that available() used to raise): the
    library loaded first stays, with one line saying that the new settings need a new process."""
    assert native.available()
    monkeypatch.setenv("CXX", str(_fake_compiler(tmp_path, f'cp "{real_library}" "$out"')))
    monkeypatch.setenv("JAXSEQ_CACHE_DIR", str(tmp_path / "cache"))
    native.reset()
    with caplog.at_level(logging.WARNING, logger="jaxseq"):
        assert native.available()
    assert "takes effect in a new process" in caplog.text and _compiles(tmp_path) == 1


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "no checksum"])
def test_a_damaged_cached_library_is_rebuilt_before_loading(damage, real_library, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CXX", str(_fake_compiler(tmp_path, f'cp "{real_library}" "$out"')))
    monkeypatch.setenv("JAXSEQ_CACHE_DIR", str(tmp_path / "cache"))
    path = build.ensure_built()
    assert _compiles(tmp_path) == 1 and build.verified(path)
    good = path.read_bytes()
    assert build.ensure_built() == path and _compiles(tmp_path) == 1  # cached: no second compile
    if damage == "truncated":  # as a build cut off or a full disk leaves it; loading it can SIGBUS
        path.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(good)))
    else:
        path.with_name(path.name + ".sha256").unlink()
    assert not build.verified(path)
    (path.parent / ".build-killed").mkdir()  # the scratch folder of a build killed midway
    with caplog.at_level(logging.WARNING, logger="jaxseq"):
        assert build.ensure_built() == path
    assert _compiles(tmp_path) == 2 and path.read_bytes() == good and build.verified(path)
    assert "(the cached copy was damaged)" in caplog.text
    assert not list(path.parent.glob(".build-*"))


def test_processes_started_together_build_once(real_library, tmp_path):
    # The compiler takes 3 s, so that the processes' starts (importing jax) overlap its run by a wide margin.
    compiler = _fake_compiler(tmp_path, f'sleep 3; cp "{real_library}" "$out"')
    env = {**os.environ, "CXX": str(compiler), "JAXSEQ_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    code = "from jaxseq import native; assert native.available(), native.unavailable_reason(); " \
           "print(native.vector_lanes())"
    processes = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in processes]
    assert [rc for _, _, rc in results] == [0, 0, 0], [err for _, err, _ in results]
    assert {out.strip() for out, _, _ in results} == {str(build.expected_lanes())}
    assert _compiles(tmp_path) == 1
    assert sum(err.count("building the native LSTM kernel") for _, err, _ in results) == 1


def _lstm_problem(key, batch, steps, in_size, hidden):
    k = jax.random.split(key, 8)
    params = cells.lstm.init(k[0], in_size, hidden)
    xs = jax.random.normal(k[1], (batch, steps, in_size))
    h0, c0 = (0.5 * jax.random.normal(k[i], (batch, hidden)) for i in (2, 3))
    lengths = jax.random.randint(k[4], (batch,), 0, steps + 1).at[0].set(steps)
    cotangents = (jax.random.normal(k[5], (batch, hidden)), jax.random.normal(k[6], (batch, hidden)),
                  jax.random.normal(k[7], (batch, steps, hidden)))
    return params, xs, h0, c0, lengths, cotangents


# Hidden sizes on and off every vector width (5 is padded; 40 is five 8-float and ten 4-float vectors), batch
# remainders of the 6-row tiles, lengths, the input product hoisted and not, a depth I + H past the 96-row
# passes, and (24, 6, 72, 64): two threads' work per step on two cores or more.
@pytest.mark.parametrize("batch,steps,in_size,hidden,with_lengths,hoisted", [
    (3, 5, 4, 5, True, False), (11, 7, 20, 40, True, True), (8, 4, 100, 32, False, False),
    (24, 6, 72, 64, True, False)])
def test_kernel_matches_autodiff_through_unroll(key, batch, steps, in_size, hidden, with_lengths, hoisted):
    """The kernel's forward and both backward forms against ``unroll`` and ``jax.vjp``, at any vector width
    (test_narrower_vector_widths runs this under JAXSEQ_NATIVE_ISA=avx2 and sse)."""
    if not native.available():
        pytest.skip(f"native kernel not available: {native.unavailable_reason()}")
    assert native.vector_lanes() == int(os.environ.get("JAXSEQ_EXPECT_LANES") or build.expected_lanes())
    params, xs, h0, c0, lengths, (dh, dc, dys) = _lstm_problem(key, batch, steps, in_size, hidden)
    lengths = lengths if with_lengths else None
    U, W, b = params["U"], params["W"], params["b"]

    def reference(params, xs, h0, c0):
        final, ys = unroll(cells.lstm.apply, params, LSTMState(h0, c0), xs, lengths=lengths)
        return final.h, final.c, ys

    expected, vjp = jax.vjp(reference, params, xs, h0, c0)
    expected_grads = vjp((dh, dc, dys))
    xs_t, dys_t = jnp.swapaxes(xs, 0, 1), jnp.swapaxes(dys, 0, 1)
    h, c, ys_t, tape = native.lstm_forward(xs_t, U, W, b, h0, c0, lengths, hoisted=hoisted, save=True)
    assert_trees_close((h, c, jnp.swapaxes(ys_t, 0, 1)), expected, atol=1e-5)
    # The weight and input gradients inside the backward loop ...
    dh0, dc0, _, (dU, dW, db), dxs_t = native.lstm_backward(W, tape, c0, dys_t, lengths, dh, dc,
                                                            weight_grads_of=(xs_t, h0, ys_t), keep_dz=False,
                                                            input_kernel=U)
    got = ({"U": dU, "W": dW, "b": db}, jnp.swapaxes(dxs_t, 0, 1), dh0, dc0)
    assert_trees_close(got, expected_grads, atol=1e-5)
    # ... and from δz after it, as the layer forms them at small batches.
    dh0, dc0, dz = native.lstm_backward(W, tape, c0, dys_t, lengths, dh, dc)
    h_prev = jnp.concatenate([h0[None], ys_t[:-1]])  # δz is zero past a row's length, so its h_prev is moot
    got = ({"U": jnp.einsum("tbi,tbg->ig", xs_t, dz), "W": jnp.einsum("tbh,tbg->hg", h_prev, dz),
            "b": dz.sum((0, 1))}, jnp.swapaxes(dz @ U.T, 0, 1), dh0, dc0)
    assert_trees_close(got, expected_grads, atol=1e-5)


@pytest.mark.parametrize("isa,lanes", [("avx2", 8), ("sse", 4)])
def test_narrower_vector_widths(isa, lanes, tmp_path):
    """This CPU's kernel built with narrower vectors (a fresh cache, warnings as errors) passes the parity test."""
    if not native.available():
        pytest.skip(f"native kernel not available: {native.unavailable_reason()}")
    if build.expected_lanes(isa) != lanes:
        pytest.skip(f"this CPU has no {isa} vectors of {lanes} floats")
    env = {**os.environ, "JAXSEQ_NATIVE_ISA": isa, "JAXSEQ_NATIVE_CXXFLAGS": "-Werror",
           "JAXSEQ_CACHE_DIR": str(tmp_path), "JAXSEQ_EXPECT_LANES": str(lanes),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    # A process of its own: the FFI target names are registered once per process.
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
                             f"{__file__}::test_kernel_matches_autodiff_through_unroll"],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "4 passed in" in result.stdout and "skipped" not in result.stdout
    assert list(tmp_path.glob("native/*.so"))


def test_native_build_command_prints_the_library(capsys, real_library):
    assert cli.main(["native", "build"]) == 0
    out = capsys.readouterr().out
    assert str(real_library) in out and f"vector lanes {native.vector_lanes()}" in out


def test_native_build_command_fails_with_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CXX", "/nonexistent")
    monkeypatch.setenv("JAXSEQ_CACHE_DIR", str(tmp_path))
    assert cli.main(["native", "build"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "jaxseq native build: error: no C++ compiler (/nonexistent) found; set CXX to a compiler to " \
                  "build the native kernel"


def test_native_info_command_says_why_and_builds_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("JAXSEQ_CACHE_DIR", str(tmp_path))
    assert cli.main(["native", "info"]) == 0
    out = capsys.readouterr().out
    assert "native kernel not available: not built yet: `jaxseq native build` builds it" in out
    assert str(tmp_path) in out and "ISA setting   native" in out
    assert not list(tmp_path.glob("**/*.so"))
    monkeypatch.setenv("JAXSEQ_NATIVE_ISA", "avx3")
    assert cli.main(["native", "info"]) == 0
    assert "not available: JAXSEQ_NATIVE_ISA='avx3' is not one of" in capsys.readouterr().out


def test_usable_cpus_without_sched_getaffinity(monkeypatch):
    """``os.sched_getaffinity`` exists on Linux only (jaxseq.layers asks how many CPUs there are on any OS)."""
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert native.usable_cpus() == 3
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert native.usable_cpus() == 1
