"""The SyncBatchNorm case: processes joined by gloo on this machine, each training one BatchNorm layer
on its share of the batch. Measures the bytes each process sends per layer and step, counted at
torch.distributed's calls, the time spent inside those calls, and the time of a training step
(forward and backward, medians):
fastbn.SyncBatchNorm against the same layer without synchronization (fastbn's and torch's BatchNorm
on the local batch). torch's own SyncBatchNorm refuses CPU tensors, so its bytes are given from
its source (torch/nn/modules/_functions.py): an all_gather of [mean, invstd, count] (2C + 1 values)
forward and an all_reduce of [sum_dy, sum_dy_xmu] (2C values) backward, in float32 for float32 input.
"""
import datetime
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastbn

from .runner import keep_freed_memory

# Per-process input shapes (the global batch is world_size times the first size).
SHAPES = [(8, 64, 56, 56), (8, 256, 28, 28), (8, 512, 14, 14), (8, 2048, 7, 7), (256, 1024)]
VARIANTS = ("fastbn_sync", "fastbn_local", "torch_local")


class CollectiveMeter:
    """While active, counts the bytes this process hands to all_gather_single / all_gather_into_tensor /
    all_reduce (what it sends; an all_gather receives world_size - 1 times as much) and the time
    spent inside those calls (transfer plus waiting for the other processes)."""

    NAMES = ("all_gather_single", "all_gather_into_tensor", "all_reduce")

    def __init__(self):
        self.sent = {}
        self.seconds = 0.0

    def __enter__(self):
        self.saved = {n: getattr(dist, n) for n in self.NAMES if hasattr(dist, n)}
        for name, fn in self.saved.items():
            def measured(*args, _fn=fn, _name=name, **kwargs):
                tensor = args[1] if _name != "all_reduce" else args[0]
                self.sent[_name] = self.sent.get(_name, 0) + tensor.numel() * tensor.element_size()
                t0 = time.perf_counter()
                try:
                    return _fn(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - t0
            setattr(dist, name, measured)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def _module(variant, channels, rank):
    if variant == "torch_local":
        return (nn.BatchNorm1d if rank == 2 else nn.BatchNorm2d)(channels)
    if variant == "fastbn_local":
        return (fastbn.BatchNorm1d if rank == 2 else fastbn.BatchNorm2d)(channels)
    return fastbn.SyncBatchNorm(channels)


def _worker(rank, world_size, init_file, reps, queue):
    torch.set_num_threads(1)  # one core per process
    keep_freed_memory()  # as in the main benchmark: kernel time, not page faults on fresh outputs
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        records = []
        for shape in SHAPES:
            g = torch.Generator().manual_seed(rank)
            x = torch.randn(shape, generator=g)
            grad = torch.randn(shape, generator=g)
            layers = {v: _module(v, shape[1], len(shape)) for v in VARIANTS}

            def step(layer):
                xi = x.detach().requires_grad_()
                layer(xi).backward(grad)

            with CollectiveMeter() as one_step:
                step(layers["fastbn_sync"])
            times = {v: [] for v in VARIANTS}
            for _ in range(2):  # warm up
                for layer in layers.values():
                    step(layer)
            in_collectives = []
            for _ in range(reps):
                for v, layer in layers.items():
                    dist.barrier()  # every process starts the step together
                    with CollectiveMeter() as meter:
                        t0 = time.perf_counter()
                        step(layer)
                        times[v].append((time.perf_counter() - t0) * 1e3)
                    if v == "fastbn_sync":
                        in_collectives.append(meter.seconds * 1e3)
            channels = shape[1]
            records.append({"shape": list(shape), "world_size": world_size, "channels": channels,
                            "bytes_sent": one_step.sent, "torch_sync_bytes_sent": 4 * (2 * channels + 1 + 2 * channels),
                            "collectives_ms": statistics.median(in_collectives),
                            **{f"{v}_ms": statistics.median(t) for v, t in times.items()}})
        if rank == 0:
            queue.put(records)
    finally:
        dist.destroy_process_group()


def run_distributed_bench(world_size=2, reps=15):
    """Spawns `world_size` gloo processes on this machine and returns rank 0's records."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_worker, args=(r, world_size, os.path.join(tmp, "init"), reps, queue))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        records = queue.get(timeout=600)
        for p in procs:
            p.join(60)
    return records


def distributed_table(records):
    head = (f"{'per-process input':<20}{'sent/step':>11}{'torch sync':>11}"
            + "".join(f"{v + ' ms':>17}" for v in VARIANTS) + f"{'in gloo ms':>12}{'sync cost':>11}")
    lines = [head, "-" * len(head)]
    for r in records:
        sent = sum(r["bytes_sent"].values())
        cells = "".join(f"{r[v + '_ms']:>17.3f}" for v in VARIANTS)
        cost = r["fastbn_sync_ms"] / r["fastbn_local_ms"]
        lines.append(f"{'x'.join(map(str, r['shape'])):<20}{sent:>9} B{r['torch_sync_bytes_sent']:>9} B{cells}"
                     f"{r['collectives_ms']:>12.3f}{cost:>10.2f}x")
    return "\n".join(lines)
