"""The fused case: training forward + backward of BatchNorm followed by ReLU (and by a residual add
and ReLU), fastbn's fused op against torch's BatchNorm and ReLU one after the other and against
fastbn's plain BatchNorm; plus the memory autograd saves for a Conv -> BN -> LeakyReLU stack."""
import gc
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from .. import BatchNormAct2d
from ..functional import batch_norm, batch_norm_act
from .runner import CacheFlusher, Timer

SHAPES = [(16, 64, 56, 56), (16, 256, 28, 28), (24, 512, 14, 14), (32, 2048, 7, 7)]
VARIANTS = ("fastbn_bn", "fastbn_bn_relu", "torch_bn_relu", "fastbn_bn_add_relu", "torch_bn_add_relu")


def _step(variant, t):
    """One training forward + backward of `variant` on the tensors `t`."""
    x = t["x"].detach().requires_grad_()
    r = t["r"].detach().requires_grad_() if "add" in variant else None
    if variant == "fastbn_bn":
        y = batch_norm(x, t["rm"], t["rv"], t["w"], t["b"], True)
    elif variant.startswith("fastbn"):
        y = batch_norm_act(x, t["rm"], t["rv"], t["w"], t["b"], True, activation="relu", residual=r)
    else:
        z = F.batch_norm(x, t["rm"], t["rv"], t["w"], t["b"], True)
        y = F.relu(z + r if r is not None else z)
    torch.autograd.backward(y, t["grad"])


def run_fused(shapes=SHAPES, reps=15, progress=None):
    """Median ms of each variant per shape (float32 NCHW, interleaved calls, cold caches)."""
    flush, timer = CacheFlusher("cpu"), Timer("cpu")
    records = []
    for shape in shapes:
        channels = shape[1]
        t = {"x": torch.randn(shape), "r": torch.randn(shape), "grad": torch.randn(shape),
             "w": (torch.rand(channels) + 0.5).requires_grad_(), "b": torch.randn(channels).requires_grad_(),
             "rm": torch.zeros(channels), "rv": torch.ones(channels)}
        for variant in VARIANTS:  # warm up
            _step(variant, t)
        times = {v: [] for v in VARIANTS}
        gc.collect()
        gc.disable()
        try:
            for _ in range(reps):
                for v in VARIANTS:
                    times[v].append(timer(lambda: _step(v, t), flush))
        finally:
            gc.enable()
        records.append({"op": "train_fwd_bwd", "shape": list(shape), "layout": "nchw", "dtype": "float32",
                        "reps": reps, "threads": torch.get_num_threads(),
                        **{f"{v}_ms": statistics.median(ms) for v, ms in times.items()}})
        if progress:
            progress()
    return records


def saved_activation_bytes(model, x):
    """Bytes of the distinct storages autograd saves in one training step, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return sum(storages.values())


def conv_bn_act_stack(norm_act, layers=10, channels=64):
    """`layers` times Conv2d(3x3) followed by the modules norm_act(channels) returns."""
    mods = []
    for _ in range(layers):
        mods += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), *norm_act(channels)]
    return nn.Sequential(*mods)


MEMORY_VARIANTS = {
    "torch BatchNorm2d + LeakyReLU": lambda c: [nn.BatchNorm2d(c), nn.LeakyReLU()],
    "fastbn BatchNormAct2d": lambda c: [BatchNormAct2d(c, activation="leaky_relu")],
    "fastbn BatchNormAct2d memory_efficient": lambda c: [BatchNormAct2d(c, activation="leaky_relu",
                                                                        memory_efficient=True)],
}


def run_memory(batch=16, size=32, channels=64):
    """Autograd-saved bytes of a 10-layer Conv -> BN -> LeakyReLU stack for each variant."""
    x = torch.randn(batch, channels, size, size)
    return {name: saved_activation_bytes(conv_bn_act_stack(make, channels=channels), x)
            for name, make in MEMORY_VARIANTS.items()}


def fused_table(records, memory):
    head = (f"{'case':<22}" + "".join(f"{v + ' ms':>23}" for v in VARIANTS)
            + f"{'relu/bn':>9}{'vs torch':>10}{'add vs torch':>14}")
    lines = [head, "-" * len(head)]
    for r in records:
        cells = "".join(f"{r[v + '_ms']:>23.3f}" for v in VARIANTS)
        lines.append(f"{'x'.join(map(str, r['shape'])) + ' nchw':<22}{cells}"
                     f"{r['fastbn_bn_relu_ms'] / r['fastbn_bn_ms']:>8.2f}x"
                     f"{r['torch_bn_relu_ms'] / r['fastbn_bn_relu_ms']:>9.2f}x"
                     f"{r['torch_bn_add_relu_ms'] / r['fastbn_bn_add_relu_ms']:>13.2f}x")
    lines.append("")
    baseline = next(iter(memory.values()))
    lines.append("autograd-saved activations, 10 x (Conv2d 3x3 -> BN -> LeakyReLU), 16x64x32x32 float32:")
    lines += [f"  {name:<42}{b / 2**20:>8.2f} MiB  ({b / baseline:.0%})" for name, b in memory.items()]
    return "\n".join(lines)
