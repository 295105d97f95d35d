#!/usr/bin/env python3
"""Fails when GCC reports that it could not vectorize a kernel loop marked `#pragma omp simd`, for
any instruction set or dtype. A loop that silently falls back to scalar code (as the float16
conversions once did on AVX2, running 10x slower) passes every correctness test, so this build-time
check guards against it. The ELU and SiLU instantiations are left out (FASTBN_VECTORIZATION_CHECK):
they call exp(), which GCC vectorizes only under -ffast-math.

    python tools/check_vectorization.py [--cxx g++]
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "csrc", "cpu", "kernels_impl.h")
UNITS = ["kernels_avx512.cpp", "kernels_avx2.cpp", "kernels_baseline.cpp"]


def simd_loops():
    """(first, last) 1-based line ranges of the loops that follow `#pragma omp simd`; GCC reports a
    loop at the line of its body's statement, which may be below the `for`."""
    with open(KERNELS) as f:
        lines = f.read().splitlines()
    loops = []
    for n, line in enumerate(lines):
        if line.strip() != "#pragma omp simd":
            continue
        first = last = n + 1  # 0-based index of the `for`
        depth = lines[first].count("{") - lines[first].count("}")
        while depth > 0 or not lines[last].rstrip().endswith((";", "}")):
            last += 1
            depth += lines[last].count("{") - lines[last].count("}")
        loops.append((first + 1, last + 1))
    return loops


def report(cxx, unit):
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as out:
        cmd = [cxx, "-O3", "-fopenmp", "-fno-trapping-math", "-ffp-contract=off", "-fPIC", "-std=c++17",
               "-DFASTBN_VECTORIZATION_CHECK", "-c", os.path.join(ROOT, "csrc", "cpu", unit),
               "-o", os.devnull, f"-fopt-info-vec-all={out.name}"]
        subprocess.run(cmd, check=True)
        return out.read()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cxx", default=os.environ.get("CXX", "g++"))
    args = p.parse_args()
    loops = simd_loops()
    pattern = re.compile(r"kernels_impl\.h:(\d+):\d+: (missed: couldn't vectorize loop)")
    failures = []
    for unit in UNITS:
        missed = {int(m.group(1)) for m in pattern.finditer(report(args.cxx, unit)) if m.group(2).startswith("missed")}
        # A loop whose body is an inlined lambda (add_rows) is reported at the lambda's line, outside
        # the loop's range; such loops are judged by their callers' loops only.
        bad = [loop for loop in loops if any(loop[0] <= line <= loop[1] for line in missed)]
        failures += [f"{unit}: the simd loop at kernels_impl.h:{first} is not vectorized" for first, _ in bad]
        print(f"{unit}: {len(loops) - len(bad)} of {len(loops)} simd loops vectorized for every dtype")
    for failure in failures:
        print(failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
