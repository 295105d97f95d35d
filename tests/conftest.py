"""Shared helpers: float64 references from torch itself, tolerances relative to torch's own error."""
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbn
from fastbn.bench.inference import BasicBlock  # noqa: F401  (torchvision's, shared by the fold and fuse tests)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp64", "fp16", "bf16"]

# Shapes over ranks 2D-5D with odd sizes: C=1, spatial=1, N=2, sizes that are not multiples of any
# vector width, planes larger than one kernel block (4096) and many-row batches (many blocks).
SHAPES = [
    (2, 1), (7, 3), (64, 17), (5, 130), (3000, 7),
    (2, 1, 1), (3, 5, 7), (4, 17, 33), (2, 3, 4500),
    (2, 3, 1, 1), (5, 1, 3, 3), (3, 7, 5, 9), (4, 16, 9, 9), (80, 2, 8, 8), (2, 3, 70, 70),
    (2, 3, 2, 3, 5), (2, 4, 3, 5, 7),
]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def shape_layouts(shapes=SHAPES):
    """(shape, layout) pairs that exist: channels_last only for 4D and 5D shapes."""
    return [pytest.param(shape, layout, id=f"{shape_id(shape)}-{layout}") for shape in shapes for layout in LAYOUTS
            if layout != "channels_last" or len(shape) in (4, 5)]


def shape_id(shape):
    return "x".join(map(str, shape))


def make_input(shape, dtype, layout, generator=None, scale=1.0, shift=0.0):
    """A random input of `shape` stored in `layout`: contiguous, channels_last(_3d) (4D/5D only) or
    'strided' (a non-contiguous view: every other element of a wider tensor)."""
    x = torch.randn(shape, dtype=torch.float64, generator=generator) * scale + shift
    if layout == "channels_last":
        assert len(shape) in (4, 5), "channels_last needs a 4D or 5D shape"
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        return x.to(dtype).contiguous(memory_format=fmt)
    if layout == "strided":
        wide = torch.empty((*shape[:-1], shape[-1] * 2), dtype=dtype)
        view = wide[..., ::2]
        view.copy_(x)
        assert not view.is_contiguous() or shape[-1] == 1
        return view
    return x.to(dtype)


def param_dtype_for(dtype):
    """Parameters as a mixed-precision user has them: float32 for half types, else the input dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def max_error(actual, reference):
    return (actual.double() - reference.double()).abs().max().item() if actual.numel() else 0.0


EPS = {torch.float64: 2.2e-16, torch.float32: 1.2e-7, torch.float16: 9.8e-4, torch.bfloat16: 7.8e-3}


def stable_seed(*parts):
    """A seed from test parameters that is the same in every process (hash() of a str is not)."""
    return zlib.crc32(repr(parts).encode())


def input_grad_scale(x, weight, grad, eps=1e-5):
    """The size of the terms a training grad_input is the difference of, weight * invstd * grad:
    with few values per channel they cancel, and the result's error follows them, not the result."""
    dims = [0] + list(range(2, x.dim()))
    invstd = (x.double().var(dims, unbiased=False) + eps).rsqrt().max().item() if x.numel() else 1.0
    w = weight.double().abs().max().item() if weight is not None else 1.0
    return w * invstd * (grad.double().abs().max().item() if grad.numel() else 0.0)


def assert_close_to_reference(actual, expected_torch, reference64, dtype, what="", scale=None):
    """fastbn's error against the float64 reference may be at most twice torch's own error in the same
    dtype, or 32 units in the last place of that dtype (relative to the values' magnitude, or to
    `scale` when given). For float64 the reference is torch's float64 result itself, so sums over
    many values are held to 1e-11."""
    assert actual.shape == reference64.shape, what
    magnitude = reference64.abs().max().item() if reference64.numel() else 0.0
    scale = max(1.0, magnitude, scale or 0.0)
    ours, theirs = max_error(actual, reference64), max_error(expected_torch, reference64)
    ulps = 32 * EPS[dtype] if dtype != torch.float64 else 1e-11
    bound = max(2.0 * theirs, ulps * scale)
    assert ours <= bound, f"{what}: fastbn error {ours:.3e} > bound {bound:.3e} (torch's error {theirs:.3e})"


SIMD_PATHS = ["avx512", "avx2", "baseline"]


@pytest.fixture(params=SIMD_PATHS)
def simd(request):
    """Runs a test on the kernels compiled for each instruction set this CPU supports."""
    default = fastbn.build_info()["simd"]
    if not fastbn._C.set_simd(request.param):
        pytest.skip(f"this CPU has no {request.param} support")
    yield request.param
    fastbn._C.set_simd(default)


# ---- models shared by the fold and fuse tests ---------------------------------------------------

def randomize_batch_norms(model, generator):
    """Running statistics and affine parameters far from their initial values, as after training."""
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            if m.track_running_stats:
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 2)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) * 3 + 0.1)
            if m.affine:
                m.weight.copy_(torch.randn(m.num_features, generator=generator))
                m.bias.copy_(torch.randn(m.num_features, generator=generator))
    return model


class Bottleneck(nn.Module):
    """torchvision's ResNet Bottleneck (1x1, 3x3, 1x1 convs), with F.relu and torch.relu forms mixed in."""

    def __init__(self, cin, width, stride=1):
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.downsample(x))


def assert_backward_gives_exactly_the_grads_asked_for(x, dy, weight, bias, residual, mask):
    """batch_norm_act_backward with output mask `mask` (bits: input, weight, bias, residual; the
    residual bit only counts when there is one) against the same call asking for every grad: the
    grads asked for are equal, the others come back empty."""
    mean, var = torch.ops.fastbn.batch_norm_stats(x)
    with_residual = residual is not None
    args = (dy, x, False, weight, bias, residual, mean, var, 1e-5, True, 1, 0.0)
    full = torch.ops.fastbn.batch_norm_act_backward(*args, [True, True, True, with_residual])
    output_mask = [bool(mask >> (3 - i) & 1) for i in range(4)]
    output_mask[3] = output_mask[3] and with_residual
    part = torch.ops.fastbn.batch_norm_act_backward(*args, output_mask)
    for name, asked, a, f in zip(["input", "weight", "bias", "residual"], output_mask, part, full):
        if asked:
            torch.testing.assert_close(a, f, rtol=0, atol=1e-12, msg=f"grad_{name}")
        else:
            assert a.numel() == 0, f"grad_{name} was not asked for"
