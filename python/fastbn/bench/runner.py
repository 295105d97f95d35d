"""Runs cases: fastbn and its peers side by side, interleaved, each timed call on cold caches."""
import ctypes
import gc
import statistics
import time

import torch

from .cases import DTYPES, OPS
from .impls import batch_norm_fn, default_impls, make_step


def keep_freed_memory():
    """Asks glibc to keep freed memory instead of handing it back to the OS. Otherwise every new
    output over the mmap threshold arrives as fresh pages whose faults (~1 us per 4 KB on the dev
    VMs, several ms for a large tensor) swamp the kernels; every implementation allocates alike,
    so this measures kernels with reused outputs. Returns False where it cannot be done."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # never trim the heap; never serve a block by mmap
    return bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


class CacheFlusher:
    """Evicts the caches before a timed call by writing a buffer several times larger than the
    last-level cache (CPU: 128 MB against 32 MB of L3 here; CUDA: 256 MB against 50-60 MB of L2)."""

    def __init__(self, device):
        size = (256 if device == "cuda" else 128) << 20
        self.buffer = torch.empty(size // 4, dtype=torch.float32, device=device)

    def __call__(self):
        self.buffer.fill_(1.0)


def nominal_bytes(op, impl, x):
    """Bytes an op must move at least: the input read and the output written (forward and eval),
    plus input and grad read and grad_input written (backward). The floor (a copy) moves 2x."""
    size = x.numel() * x.element_size()
    return 5 * size if op == "train_fwd_bwd" and impl != "floor" else 2 * size


class Timer:
    """Wall time of one call on the CPU. On CUDA, GPU time between two events: a sleep kernel queued
    first keeps the GPU busy while Python queues the flush and the step, so the events time the
    kernels back to back (kernel time), not the launch overhead of small layers. Where the GPU
    reached the start event before the step was queued, the sleep was too short: the call is timed
    again with a sleep twice as long (kept for later calls)."""

    MAX_SLEEP_CYCLES = 8_000_000  # ~4 ms

    def __init__(self, device):
        self.cuda = device == "cuda"
        self.sleep_cycles = 500_000  # ~0.25 ms at 2 GHz

    def __call__(self, step, flush):
        if not self.cuda:
            flush()
            t0 = time.perf_counter()
            step()
            return (time.perf_counter() - t0) * 1e3
        while True:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(self.sleep_cycles)
            flush()
            start.record()
            step()
            end.record()
            covered = not start.query()
            end.synchronize()
            if covered or self.sleep_cycles >= self.MAX_SLEEP_CYCLES:  # a step that syncs is never covered
                return start.elapsed_time(end)
            self.sleep_cycles *= 2


def case_tensors(case, device):
    """The tensors a case's steps run on: input, grad, preallocated output, parameters and running
    statistics (float32 parameters for 16-bit inputs)."""
    dtype = DTYPES[case.dtype]
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    channels = case.shape[1]
    fmt = case.memory_format()
    x = torch.randn(case.shape, device=device).to(dtype).contiguous(memory_format=fmt)
    return {
        "x": x,
        "grad": torch.randn(case.shape, device=device).to(dtype).contiguous(memory_format=fmt),
        "out": torch.empty_like(x),
        "w": (torch.rand(channels, device=device, dtype=param_dtype) + 0.5).requires_grad_(),
        "b": torch.randn(channels, device=device, dtype=param_dtype).requires_grad_(),
        "rm": torch.zeros(channels, device=device, dtype=param_dtype),
        "rv": torch.ones(channels, device=device, dtype=param_dtype),
    }


def run_case(case, ops=OPS, impls=None, reps=15, device="cpu", flush=None, on_op_done=None):
    """Times every op of `case` for every implementation (default: all for the device); returns one
    record per (op, impl)."""
    impls = impls or default_impls(device)
    flush = flush or CacheFlusher(device)
    timer = Timer(device)
    previous_threads = torch.get_num_threads()
    if case.threads:
        torch.set_num_threads(case.threads)
    try:
        torch._dynamo.reset()  # inductor compiles this case's shapes afresh, statically
        fns = {impl: batch_norm_fn(impl) for impl in impls if impl != "floor"}
        t = case_tensors(case, device)
        records = []
        for op in ops:
            steps = {impl: make_step(impl, op, fns.get(impl), t) for impl in impls}
            for step in steps.values():  # warm up: compile, allocator, first touch
                step()
                step()
            times = {impl: [] for impl in impls}
            gc.collect()
            gc.disable()  # as timeit does: a collection inside a call would charge it a full pass
            try:
                for _ in range(reps):
                    for impl, step in steps.items():  # interleaved, so drift hits all alike
                        times[impl].append(timer(step, flush))
            finally:
                gc.enable()
            medians = {impl: statistics.median(v) for impl, v in times.items()}
            floor = medians.get("floor")
            for impl, ms in medians.items():
                records.append({
                    "op": op, "shape": list(case.shape), "layout": case.layout, "dtype": case.dtype, "impl": impl,
                    "median_ms": ms, "gbps": nominal_bytes(op, impl, t["x"]) / ms / 1e6,
                    "floor_ratio": ms / floor if floor else None, "threads": torch.get_num_threads(),
                    "device": device, "reps": reps, "label": case.label,
                })
            if on_op_done:
                on_op_done()
        return records
    finally:
        torch.set_num_threads(previous_threads)


def run_cases(cases, ops=OPS, impls=None, reps=15, device="cpu", progress=None):
    """Runs every case; `progress` (optional) is called once per finished (case, op)."""
    flush = CacheFlusher(device)
    records = []
    for case in cases:
        records += run_case(case, ops, impls, reps, device, flush, progress)
    return records
