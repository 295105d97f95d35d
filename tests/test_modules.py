"""fastbn.BatchNorm1d/2d/3d and fastbn.convert against torch's modules."""
import copy

import pytest
import torch
from torch import nn

import fastbn

CASES = [(fastbn.BatchNorm1d, nn.BatchNorm1d, (8, 5)), (fastbn.BatchNorm1d, nn.BatchNorm1d, (8, 5, 7)),
         (fastbn.BatchNorm2d, nn.BatchNorm2d, (4, 5, 6, 7)), (fastbn.BatchNorm3d, nn.BatchNorm3d, (2, 5, 3, 4, 5))]
CASE_IDS = ["1d-2D", "1d-3D", "2d", "3d"]


def _pair(fast_cls, torch_cls, **kwargs):
    torch.manual_seed(0)
    ref = torch_cls(5, dtype=torch.float64, **kwargs)
    if ref.affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-1, 1)
    fast = fast_cls(5, dtype=torch.float64, **kwargs)
    fast.load_state_dict(ref.state_dict())
    return fast, ref


def _assert_same_state(fast, ref):
    fs, rs = fast.state_dict(), ref.state_dict()
    assert fs.keys() == rs.keys()
    for k in fs:
        torch.testing.assert_close(fs[k], rs[k], rtol=1e-12, atol=1e-12, msg=k)


@pytest.mark.parametrize("fast_cls, torch_cls, shape", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kwargs", [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False},
                                    {"momentum": 0.5, "eps": 1e-3}],
                         ids=["default", "momentum-None", "no-affine", "no-running-stats", "momentum-eps"])
def test_module_matches_torch_over_steps(fast_cls, torch_cls, shape, kwargs):
    fast, ref = _pair(fast_cls, torch_cls, **kwargs)
    assert isinstance(fast, torch_cls)
    g = torch.Generator().manual_seed(7)
    for step in range(4):
        x = torch.randn(shape, dtype=torch.float64, generator=g) * (step + 1) + step
        xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        yf, yr = fast(xf), ref(xr)
        torch.testing.assert_close(yf, yr, rtol=1e-10, atol=1e-10)
        grad = torch.randn(shape, dtype=torch.float64, generator=g)
        yf.backward(grad)
        yr.backward(grad)
        torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-10, atol=1e-10)
        _assert_same_state(fast, ref)
    if ref.affine:
        torch.testing.assert_close(fast.weight.grad, ref.weight.grad, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(fast.bias.grad, ref.bias.grad, rtol=1e-10, atol=1e-10)
    fast.eval()
    ref.eval()
    x = torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    yf, yr = fast(x), ref(xr)
    torch.testing.assert_close(yf, yr, rtol=1e-10, atol=1e-10)
    yf.sum().backward()
    yr.sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-10)
    _assert_same_state(fast, ref)


def test_constructor_and_state_dict_round_trip():
    ref = nn.BatchNorm2d(6, eps=1e-3, momentum=0.2, dtype=torch.float64)
    fast = fastbn.BatchNorm2d(6, eps=1e-3, momentum=0.2, device="cpu", dtype=torch.float64)
    assert fast.weight.dtype == torch.float64 and fast.running_mean.dtype == torch.float64
    assert repr(fast).endswith(repr(ref).split("(", 1)[1])
    ref(torch.randn(4, 6, 3, 3, dtype=torch.float64))  # non-trivial running stats
    fast.load_state_dict(ref.state_dict(), strict=True)
    back = nn.BatchNorm2d(6, dtype=torch.float64)
    back.load_state_dict(fast.state_dict(), strict=True)
    _assert_same_state(back, ref)
    assert int(fast.num_batches_tracked) == 1


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_module_channels_last(fmt):
    fast, ref = _pair(fastbn.BatchNorm2d, nn.BatchNorm2d)
    x = torch.randn(4, 5, 6, 7, dtype=torch.float64).to(memory_format=fmt)
    y = fast(x)
    assert y.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(y, ref(x), rtol=1e-10, atol=1e-10)


class BasicBlock(nn.Module):
    """A ResNet basic block with a projection shortcut."""

    def __init__(self, cin, cout, stride=2):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class SmallResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = BasicBlock(8, 16)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.BatchNorm1d(32), nn.ReLU(),
                                  nn.Linear(32, 10))

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


def test_convert_resnet_block():
    torch.manual_seed(0)
    model = SmallResNet().double()
    reference = copy.deepcopy(model)
    model.block.bn2.eval()  # a per-module training flag must survive the conversion
    reference.block.bn2.eval()
    params = {name: p for name, p in model.named_parameters()}
    converted = fastbn.convert(model)
    assert converted is model
    bns = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 5
    assert all(type(m) in (fastbn.BatchNorm1d, fastbn.BatchNorm2d) for m in bns)
    assert not converted.block.bn2.training and converted.block.bn1.training
    for name, p in converted.named_parameters():  # the very same Parameters, not copies
        assert p is params[name]
    assert all(b.dtype == torch.float64 for b in converted.buffers() if b.is_floating_point())
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    for _ in range(2):
        torch.testing.assert_close(converted(x), reference(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(converted.state_dict(), reference.state_dict(), rtol=1e-10, atol=1e-10)
    converted.eval()
    reference.eval()
    torch.testing.assert_close(converted(x), reference(x), rtol=1e-10, atol=1e-10)


def test_convert_bare_module_and_idempotence():
    bn = nn.BatchNorm3d(4, momentum=None, affine=False)
    fast = fastbn.convert(bn)
    assert type(fast) is fastbn.BatchNorm3d and fast.momentum is None and not fast.affine
    assert fast.running_mean is bn.running_mean
    assert fastbn.convert(fast) is fast
    seq = nn.Sequential(fast)
    assert fastbn.convert(seq)[0] is fast
