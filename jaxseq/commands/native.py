"""``jaxseq native``: build the native CPU LSTM kernel ahead of time, or say whether it is available and why.

Example::

    jaxseq native build     # compiles once into the cache (a few seconds), prints the path, vector width, time
    jaxseq native info      # available or not and why, the settings, the cache path, the CPU's vector width

``build`` exits 2 with one line (and the compiler's output, if it ran) when the kernel cannot be built here;
``info`` builds nothing and exits 0 either way.
"""
from __future__ import annotations

import os
import shutil
import sys
import time


def register(subparsers) -> None:
    p = subparsers.add_parser("native", help="build the native CPU LSTM kernel ahead of time, or show its status",
                              description="The fused LSTM's optional native CPU kernel (jaxseq.native): `build` "
                                          "compiles it into the cache now rather than on first use; `info` says "
                                          "whether it is available and why, without building.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("build", help="compile (if not cached) and load the kernel; print its path, vector width "
                                     "and the time taken").set_defaults(run=run_build)
    actions.add_parser("info", help="whether the kernel is available and why, the settings and the cache path "
                                    "(builds nothing)").set_defaults(run=run_info)


def run_build(args) -> int:
    del args
    from jaxseq.native import build

    start = time.perf_counter()
    try:
        cached = build.verified(build.library_path())
        path = build.ensure_built()
    except build.BuildError as error:
        if error.details:
            print(error.details.rstrip(), file=sys.stderr)
        print(f"jaxseq native build: error: {error}", file=sys.stderr)
        return 2
    from jaxseq import native

    failure = native.load_failure()
    if failure is not None:  # built, but loading it failed
        print(f"jaxseq native build: error: {failure}", file=sys.stderr)
        return 2
    lanes, reason = native.vector_lanes(), native.unavailable_reason()
    print(f"{'cached' if cached else 'built'} {path}")
    print(f"vector lanes {lanes} (ISA setting {build.isa()}), {time.perf_counter() - start:.1f} s")
    if reason is not None:
        print(f"note: the layers will not call it in this process: {reason}")
    return 0


def run_info(args) -> int:
    del args
    from jaxseq import native
    from jaxseq.native import build

    flags = set(build.cpu_flags().split())
    widest = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "avx" if "avx" in flags else "sse"
    lines = []
    try:
        build.check_platform()
        setting = build.isa()
        path = build.library_path()
        compiler = build.compiler()[0]
        lines += [f"ISA setting   {setting} (this CPU's widest: {widest}; vectors of {build.expected_lanes()} "
                  "floats)",
                  f"compiler      {shutil.which(compiler) or compiler + ' (not found)'}",
                  f"library       {path} ({'built' if build.verified(path) else 'not built'})"]
        reason = native.unavailable_reason(build_if_needed=False)
    except build.BuildError as error:
        reason = str(error)
    cpus, cap = native.usable_cpus(), os.environ.get("JAXSEQ_NATIVE_THREADS")
    lines.append(f"threads       at most {cap} (JAXSEQ_NATIVE_THREADS) of the {cpus} CPUs this process may use"
                 if cap else f"up to {cpus}, the CPUs this process may use")
    status = "available" if reason is None else f"not available: {reason}"
    print("\n".join([f"native kernel {status}", *lines]))
    return 0
