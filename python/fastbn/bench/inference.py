"""The inference case: a small ResNet run with torch's BatchNorm, with fastbn's, and with BatchNorm
folded into the convolutions (fastbn.fold), in eval mode under torch.inference_mode."""
import copy
import gc
import statistics

import torch
from torch import nn

from .. import convert, fold
from .runner import CacheFlusher, Timer

VARIANTS = ("torch_bn", "fastbn_bn", "folded")


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, as written there (inplace ReLU module, `out += identity`)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


def small_resnet(widths=(32, 64, 128, 256), classes=100):
    """A ResNet-18-shaped network (two basic blocks per stage) with narrower stages, for 64x64 images."""
    layers = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
    cin = widths[0]
    for stage, width in enumerate(widths):
        layers += [BasicBlock(cin, width, 1 if stage == 0 else 2), BasicBlock(width, width, 1)]
        cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def _trained_like(model):
    """Running statistics and affine parameters away from their defaults, as after training."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def run_inference(batches=(1, 16), size=64, layouts=("nchw", "nhwc"), reps=15, device="cpu", progress=None):
    """Times the three variants side by side, interleaved, at each batch size (1: latency, where the
    per-layer overhead shows; 16: throughput); one record per (batch, layout, variant) with the largest
    difference of the variant's output from torch's, relative to the output's largest magnitude."""
    torch.manual_seed(0)
    base = _trained_like(small_resnet()).to(device)
    models = {"torch_bn": base, "fastbn_bn": convert(copy.deepcopy(base)), "folded": fold(base)}
    flush, timer = CacheFlusher(device), Timer(device)
    records = []
    for batch, layout in [(b, lay) for b in batches for lay in layouts]:
        fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
        x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
        variants = {name: m.to(memory_format=fmt) for name, m in models.items()}
        with torch.inference_mode():
            outputs = {name: m(x) for name, m in variants.items()}  # warm up, and the outputs to compare
            for m in variants.values():
                m(x)
            times = {name: [] for name in variants}
            gc.collect()
            gc.disable()
            try:
                for _ in range(reps):
                    for name, m in variants.items():
                        times[name].append(timer(lambda: m(x), flush))
            finally:
                gc.enable()
        scale = outputs["torch_bn"].abs().max().item()
        for name, t in times.items():
            records.append({
                "op": "inference", "model": "small_resnet18", "shape": list(x.shape), "layout": layout,
                "dtype": "float32", "impl": name, "median_ms": statistics.median(t), "reps": reps,
                "max_rel_diff": (outputs[name] - outputs["torch_bn"]).abs().max().item() / scale,
                "threads": torch.get_num_threads(), "device": device,
                "label": f"small ResNet-18 {batch}x3x{size}x{size} {layout}",
            })
        if progress:
            progress()
    return records


def inference_table(records):
    head = f"{'model':<40}{'variant':>11}{'median ms':>11}{'vs torch':>10}{'max rel diff':>14}"
    lines = [head, "-" * len(head)]
    for r in records:
        torch_ms = next(o["median_ms"] for o in records if o["label"] == r["label"] and o["impl"] == "torch_bn")
        lines.append(f"{r['label']:<40}{r['impl']:>11}{r['median_ms']:>11.2f}{torch_ms / r['median_ms']:>9.2f}x"
                     f"{r['max_rel_diff']:>14.1e}")
    return "\n".join(lines)
