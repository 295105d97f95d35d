"""Where a training step's GPU time goes, kernel by kernel: fastbn (its choice by shape, and each CUDA
path forced) and torch (cuDNN where it picks it) on a few ResNet-50 layers, warm caches, torch.profiler.
It tells which kernel of a slow case to work on; the benchmark CLI gives the cold-cache comparison.

    python bench/gpu_profile.py [--steps 20]
"""
import argparse
import collections
import re
import sys

import torch

from fastbn.bench.cases import Case
from fastbn.bench.impls import batch_norm_fn, make_step
from fastbn.bench.runner import case_tensors

CASES = [  # the slowest against torch/cuDNN in the first H200 run, and a large one
    ((32, 64, 56, 56), "nhwc", "float16"),
    ((32, 64, 56, 56), "nhwc", "float32"),
    ((32, 256, 14, 14), "nchw", "float16"),
    ((32, 256, 14, 14), "nhwc", "float32"),
    ((32, 1024, 14, 14), "nchw", "float32"),
    ((32, 2048, 7, 7), "nhwc", "float32"),
    ((32, 512, 28, 28), "nhwc", "bfloat16"),
    ((2048, 768), "nchw", "float32"),
    ((32, 256, 56, 56), "nchw", "float32"),
]
IMPLS = ("fastbn", "fastbn_two_pass", "fastbn_persistent", "torch")
OPS = ("train_fwd", "train_fwd_bwd")


def short_name(kernel):
    """A kernel's name without return type, namespaces, template arguments or parameters."""
    name = re.sub(r"^void ", "", kernel)
    depth, out = 0, []
    for ch in name:  # drop <...> and (...) however deeply nested
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out).split("::")[-1].strip() or kernel[:40]


def kernel_times(step, steps):
    """Mean microseconds per step of each kernel (by short name, with launches per step)."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    total, count = collections.Counter(), collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            total[short_name(e.name)] += e.time_range.elapsed_us()
            count[short_name(e.name)] += 1
    return {k: (total[k] / steps, count[k] / steps) for k in total}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: GPU microseconds per step, "
          f"mean of {args.steps}, warm caches; kernels as name time xlaunches")
    for shape, layout, dtype in CASES:
        case = Case(shape, layout, dtype)
        t = case_tensors(case, "cuda")
        for op in OPS:
            print(f"\n{case.label} {op}")
            for impl in IMPLS:
                times = kernel_times(make_step(impl, op, batch_norm_fn(impl), t), args.steps)
                kernels = "  ".join(f"{k} {us:.1f}x{n:g}" for k, (us, n) in
                                    sorted(times.items(), key=lambda kv: -kv[1][0]))
                print(f"  {impl:18s} {sum(us for us, _ in times.values()):7.1f}  {kernels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
