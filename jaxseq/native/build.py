"""Building the native LSTM kernel: the compile command, the cache, the lock between processes, the check
before loading.

The library is compiled once per key (the source, the compile command with its ISA flags, jaxlib's version and
the CPU's flags) into ``$JAXSEQ_CACHE_DIR/native/lstm_cpu-<key>.so`` (default ``~/.cache/jaxseq``), beside a
sidecar ``lstm_cpu-<key>.so.sha256`` written after it. A process that finds no verified library takes an
exclusive ``flock`` on the folder's ``.lock`` file, looks again (another process may have built it while it
waited), builds into a scratch folder and moves the library, then the sidecar, into place, so that pytest
workers or training processes started together compile once. A library whose bytes do not match its sidecar
(a build cut off, a full disk, a damaged copy) is rebuilt rather than loaded: loading a truncated shared
object can kill the process with SIGBUS.

Everything that can go wrong raises ``BuildError`` with a one-line message (``jaxseq.native`` logs it once and
keeps XLA's loops; ``jaxseq native build`` prints it and exits 2).

Settings, read from the environment at each build (all part of the key):

- ``CXX``: the compiler command (default ``c++``; may carry words, as ``ccache g++``).
- ``JAXSEQ_NATIVE_ISA``: ``native`` (default: the widest vectors of this CPU), ``avx2`` (at most AVX2: 8
  floats, ``-mno-avx512f``) or ``sse`` (no AVX: 4 floats, ``-mno-avx``). Each caps ``-march=native``, so
  none builds code this CPU cannot run; the narrower ones let an AVX-512 machine test the other widths.
- ``JAXSEQ_NATIVE_CXXFLAGS``: extra compiler flags, appended (e.g. ``-Werror``, as the tests build).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("lstm_cpu.cc")
# Flags after -march=native that cap the vector width; -mno-avx also turns off AVX2, FMA and AVX-512.
ISA_FLAGS = {"native": [], "avx2": ["-mno-avx512f"], "sse": ["-mno-avx"]}
# A build that hangs (a wedged compiler wrapper) must not hold the lock, and every other process, forever.
COMPILE_TIMEOUT_S = 600

log = logging.getLogger("jaxseq.native")


class BuildError(Exception):
    """Why the kernel cannot be built or loaded here, in one line; ``details``: the compiler's output, if any."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


def check_platform() -> None:
    system, machine = platform.system(), platform.machine()
    if system != "Linux" or machine not in ("x86_64", "AMD64"):
        # The kernel's vector code, thread affinity and madvise calls are written for x86-64 Linux.
        raise BuildError(f"the native LSTM kernel needs x86-64 Linux, this is {system or 'unknown'} "
                         f"{machine or 'unknown'}")


def isa() -> str:
    """The ``JAXSEQ_NATIVE_ISA`` setting, checked."""
    value = os.environ.get("JAXSEQ_NATIVE_ISA") or "native"
    if value not in ISA_FLAGS:
        raise BuildError(f"JAXSEQ_NATIVE_ISA={value!r} is not one of {', '.join(ISA_FLAGS)}")
    return value


def cpu_flags() -> str:
    """The ``flags`` line of ``/proc/cpuinfo`` (x86), or "" where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def expected_lanes(setting: str | None = None, flags: str | None = None) -> int:
    """Floats per vector that a build with this ISA setting has on this CPU (what ``vector_lanes()`` returns)."""
    setting = isa() if setting is None else setting
    flags = set((cpu_flags() if flags is None else flags).split())
    if "avx512f" in flags and setting == "native":
        return 16
    return 8 if "avx" in flags and setting != "sse" else 4


def compiler() -> list[str]:
    return shlex.split(os.environ.get("CXX") or "") or ["c++"]


def compile_command(output: Path | str, include_dir: str | None = None) -> list[str]:
    if include_dir is None:
        import jax

        include_dir = jax.ffi.include_dir()
    # -isystem: the FFI headers' own warnings (unused parameters, sign comparisons) are not this file's to fix.
    return [*compiler(), "-O3", "-march=native", *ISA_FLAGS[isa()], "-std=c++17", "-shared", "-fPIC",
            "-fno-math-errno", "-pthread", "-Wall", "-Wextra",
            *shlex.split(os.environ.get("JAXSEQ_NATIVE_CXXFLAGS", "")), "-isystem", include_dir, str(SOURCE),
            "-o", str(output)]


def cache_dir() -> Path:
    root = os.environ.get("JAXSEQ_CACHE_DIR")
    if not root:
        try:
            root = Path.home() / ".cache" / "jaxseq"
        except RuntimeError:  # no HOME and no password entry (some containers)
            raise BuildError("no home folder for the native kernel's cache; set JAXSEQ_CACHE_DIR") from None
    return Path(root) / "native"


def library_path() -> Path:
    """Where the library for the current settings is (or will be) cached."""
    import jax

    key = hashlib.sha256("\0".join([SOURCE.read_text(), *compile_command("lib.so"), jax.lib.__version__,
                                    cpu_flags()]).encode()).hexdigest()[:16]
    return cache_dir() / f"lstm_cpu-{key}.so"


def _sidecar(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verified(library: Path) -> bool:
    """Whether the library is there and its bytes are those its builder recorded in the sidecar."""
    try:
        return _sidecar(library).read_text().strip() == _digest(library)
    except (OSError, UnicodeDecodeError):
        return False


@contextlib.contextmanager
def _locked(folder: Path):
    """Holds an exclusive lock on ``folder/.lock`` (released when the process dies, however it dies); yields
    whether it holds it."""
    import fcntl  # Unix only: imported here so that jaxseq.native imports everywhere

    with open(folder / ".lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: concurrent builds then each build; the moves stay atomic
            yield False
        else:
            yield True


def _compile(target: Path, command_name: str) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as scratch:
        built = Path(scratch) / target.name
        try:
            result = subprocess.run(compile_command(built), capture_output=True, text=True,
                                    timeout=COMPILE_TIMEOUT_S)
        except OSError as error:  # found on the PATH, but not a program this system can run
            raise BuildError(f"could not run the C++ compiler {command_name} ({error.strerror or error})") from None
        except subprocess.TimeoutExpired as error:
            raise BuildError(f"building the native LSTM kernel took over {COMPILE_TIMEOUT_S} s; stopped it",
                             (error.stderr or b"").decode(errors="replace")) from None
        if result.returncode != 0 or not built.is_file():
            errors = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.splitlines()
            first = errors[0].strip() if errors else "no output"
            raise BuildError(f"building the native LSTM kernel failed ({command_name} exited with "
                             f"{result.returncode}: {first[:300]}); `jaxseq native build` shows the compiler's "
                             "output", result.stderr)
        sidecar = Path(scratch) / _sidecar(target).name
        sidecar.write_text(_digest(built) + "\n")
        # The library first, then its sidecar: a reader between the two moves finds bytes that do not match
        # the sidecar, and waits for the lock.
        os.replace(built, target)
        os.replace(sidecar, _sidecar(target))


def ensure_built() -> Path:
    """The verified library for the current settings, built first if it is not cached (``BuildError`` if that
    cannot be done here)."""
    check_platform()
    command_name = compiler()[0]
    if shutil.which(command_name) is None:
        raise BuildError(f"no C++ compiler ({command_name}) found; set CXX to a compiler to build the native "
                         "kernel")
    target = library_path()
    if verified(target):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _locked(target.parent) as alone:
            if verified(target):  # another process built it while this one waited for the lock
                return target
            # Scratch folders of builds killed midway (no other build runs while this process holds the lock).
            for stale in target.parent.glob(".build-*") if alone else ():
                shutil.rmtree(stale, ignore_errors=True)
            damaged = " (the cached copy was damaged)" if target.exists() else ""
            # A warning, so that it shows on stderr by default (logging's last-resort handler) when nothing
            # configured logging: the first call pauses for a few seconds, and the user should know why.
            log.warning("jaxseq: building the native LSTM kernel for this CPU (once) into %s%s ...", target,
                        damaged)
            _compile(target, command_name)
    except OSError as error:
        where = error.filename or target.parent
        raise BuildError(f"cannot write the native kernel's cache {where} ({error.strerror or error}); set "
                         "JAXSEQ_CACHE_DIR to a writable folder") from None
    if not verified(target):
        raise BuildError(f"the native kernel built into {target} does not match its checksum after the build")
    return target
