"""The per-call cost of a small layer: BatchNorm2d modules (and BatchNorm2d + ReLU, fused in
fastbn's BatchNormAct2d) called back to back on a tiny input, where the time is the Python,
dispatcher and autograd work around the kernels rather than the kernels themselves. On a GPU that
work is what a small layer costs in eager mode, whenever it exceeds the kernels' time."""
import gc
import statistics
import time

import torch
from torch import nn

from .. import BatchNormAct2d, convert
from .cases import OPS

SHAPE = (8, 16, 4, 4)
IMPLS = ("torch", "fastbn")
# module name -> (torch's module, fastbn's), for SHAPE's channels
MODULES = {
    "BatchNorm2d": lambda c: (nn.BatchNorm2d(c), convert(nn.BatchNorm2d(c))),
    "BatchNorm2d+ReLU": lambda c: (nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True)), BatchNormAct2d(c)),
}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _step(module, op, x, grad):
    if op == "eval_fwd":
        def step():
            with torch.no_grad():
                module(x)
    elif op == "train_fwd":
        def step():
            module(x)
    else:
        def step():
            module(x).backward(grad)
    return step


def run_overhead(device="cpu", reps=15, calls=200, progress=None):
    """Per module, op and implementation: the median over `reps` runs of `calls` back-to-back calls,
    in ms per call."""
    torch.manual_seed(0)
    x = torch.randn(SHAPE, device=device, requires_grad=True)
    grad = torch.randn_like(x)
    records = []
    for name, make in MODULES.items():
        modules = dict(zip(IMPLS, (m.to(device) for m in make(SHAPE[1]))))
        for op in OPS:
            steps = {}
            for impl in IMPLS:
                modules[impl].train(op != "eval_fwd")
                steps[impl] = _step(modules[impl], op, x, grad)
                for _ in range(20):  # warm up
                    steps[impl]()
            times = {impl: [] for impl in IMPLS}
            gc.collect()
            gc.disable()
            try:
                for _ in range(reps):
                    for impl in IMPLS:  # interleaved
                        _sync(device)
                        t0 = time.perf_counter()
                        for _ in range(calls):
                            steps[impl]()
                        _sync(device)
                        times[impl].append((time.perf_counter() - t0) * 1e3 / calls)
            finally:
                gc.enable()
            for impl in IMPLS:
                records.append({"op": op, "module": name, "shape": list(SHAPE), "layout": "nchw", "dtype": "float32",
                                "impl": impl, "median_ms": statistics.median(times[impl]), "gbps": None,
                                "floor_ratio": None, "threads": torch.get_num_threads(), "device": device,
                                "reps": reps, "label": "x".join(map(str, SHAPE)) + " per call"})
            if progress:
                progress()
    return records


def overhead_table(records):
    head = f"{'module':<18}{'op':<16}{'torch us':>10}{'fastbn us':>11}{'fastbn / torch':>16}"
    lines = [head, "-" * len(head)]
    for name in MODULES:
        for op in OPS:
            us = {r["impl"]: r["median_ms"] * 1e3 for r in records if r["op"] == op and r["module"] == name}
            lines.append(f"{name:<18}{op:<16}{us['torch']:>10.1f}{us['fastbn']:>11.1f}"
                         f"{us['fastbn'] / us['torch']:>15.2f}x")
    return "\n".join(lines)
