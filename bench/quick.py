"""First benchmark: fastbn vs torch's F.batch_norm on the CPU, side by side in one run.

Each case times training forward, training forward+backward and eval forward (under
inference_mode). Calls alternate between implementations, every timed call starts with cold
caches (a buffer larger than the last-level cache is written first), the garbage collector is
off while timing (as in timeit), and the table shows medians and the speed-up.

    python bench/quick.py [--threads N] [--reps 15] [--dtype float32|bfloat16|float16|float64]
"""
import argparse
import ctypes
import gc
import os
import statistics
import time

# numpy's OpenBLAS (imported by torch) starts a thread per core that competes for the CPUs being
# measured; nothing here uses BLAS. Must be set before numpy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastbn  # noqa: E402
import fastbn.functional as FB  # noqa: E402

CASES = [  # (label, shape, memory format)
    ("resnet 16x256x28x28", (16, 256, 28, 28), torch.contiguous_format),
    ("resnet 24x512x14x14", (24, 512, 14, 14), torch.contiguous_format),
    ("resnet 16x64x56x56", (16, 64, 56, 56), torch.contiguous_format),
    ("nhwc 16x256x28x28", (16, 256, 28, 28), torch.channels_last),
    ("bn1d 2048x768", (2048, 768), torch.contiguous_format),
]
IMPLS = {"torch": F.batch_norm, "fastbn": FB.batch_norm}


def keep_freed_memory():
    """Tells glibc to keep freed blocks instead of returning them to the OS. Otherwise every new
    output over the mmap threshold is fresh pages, and its page faults (~1 us per 4 KB page on
    these VMs, ~3 ms for 12.8 MB) swamp the kernels being compared; both sides allocate alike."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # never trim the heap; never serve a block by mmap
    return bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


class CacheFlusher:
    """Writes a buffer of 4x the last-level cache (L3 is 32 MB on this VM) to evict everything."""

    def __init__(self, mbytes=128):
        self.buf = torch.empty(mbytes * 1024 * 1024 // 4, dtype=torch.float32)

    def __call__(self):
        self.buf.fill_(1.0)


def make_step(fn, op, x, weight, bias, rm, rv, grad):
    if op == "train_fwd":
        return lambda: fn(x, rm, rv, weight, bias, training=True)
    if op == "eval_fwd":  # inference, as models are run for it: without autograd
        def eval_fwd():
            with torch.inference_mode():
                fn(x, rm, rv, weight, bias, training=False)
        return eval_fwd

    def fwd_bwd():
        xg = x.detach().requires_grad_()
        y = fn(xg, rm, rv, weight, bias, training=True)
        torch.autograd.backward(y, grad)
    return fwd_bwd


def bench_case(shape, fmt, dtype, reps, flush):
    C = shape[1]
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)
    grad = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)
    pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    weight = torch.rand(C, dtype=pdt).requires_grad_()
    bias = torch.rand(C, dtype=pdt).requires_grad_()
    rows = {}
    for op in ("train_fwd", "train_fwd_bwd", "eval_fwd"):
        steps = {name: make_step(fn, op, x, weight, bias, torch.zeros(C, dtype=pdt), torch.ones(C, dtype=pdt), grad)
                 for name, fn in IMPLS.items()}
        times = {name: [] for name in steps}
        for name, step in steps.items():  # warm up (allocator, first-touch)
            step()
        # As timeit does, the garbage collector is off while timing: a collection that happens to
        # fall inside a call would charge it a pass over every object torch has created.
        gc.collect()
        gc.disable()
        try:
            for _ in range(reps):
                for name, step in steps.items():  # interleaved, so drift hits both alike
                    flush()
                    t0 = time.perf_counter()
                    step()
                    times[name].append(time.perf_counter() - t0)
        finally:
            gc.enable()
        rows[op] = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    p.add_argument("--fresh-pages", action="store_true",
                   help="leave glibc's default policy: outputs then come as new pages, page faults included")
    args = p.parse_args()
    reused = not args.fresh_pages and keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    info = fastbn.build_info()
    print(f"fastbn {info['version']} (simd={info['simd']}, openmp={info['openmp']}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.dtype}, median of {args.reps} cold-cache calls, "
          f"{'freed memory reused' if reused else 'outputs on fresh pages'}")
    flush = CacheFlusher()
    header = f"{'case':<22} {'op':<14} {'torch ms':>9} {'fastbn ms':>10} {'speed-up':>9}"
    print(header)
    print("-" * len(header))
    for label, shape, fmt in CASES:
        for op, r in bench_case(shape, fmt, dtype, args.reps, flush).items():
            print(f"{label:<22} {op:<14} {r['torch']:>9.3f} {r['fastbn']:>10.3f} {r['torch'] / r['fastbn']:>8.2f}x")


if __name__ == "__main__":
    main()
