"""fastbn.fold: folded models equal the original in eval mode; what must stay, stays; and why is reported."""
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbn
from conftest import BasicBlock, randomize_batch_norms

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}

# (name, layer factory, BatchNorm rank, input shape): every producer kind with groups, dilation, stride,
# padding modes, output padding, with and without bias.
PRODUCERS = [
    ("conv1d", lambda: nn.Conv1d(6, 9, 3, stride=2, padding=2, dilation=2, groups=3, padding_mode="reflect"), 1,
     (3, 6, 11)),
    ("conv2d", lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False, padding_mode="circular"), 2, (2, 4, 7, 5)),
    ("conv3d", lambda: nn.Conv3d(2, 5, (1, 3, 2), stride=(1, 2, 1), padding=1, padding_mode="replicate"), 3,
     (2, 2, 3, 6, 5)),
    ("convT1d", lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, output_padding=1, groups=2), 1, (3, 4, 5)),
    ("convT2d", lambda: nn.ConvTranspose2d(6, 9, 3, stride=2, padding=1, dilation=2, groups=3, bias=False), 2,
     (2, 6, 4, 5)),
    ("convT3d", lambda: nn.ConvTranspose3d(2, 3, 2, stride=2), 3, (2, 2, 2, 3, 2)),
    ("linear", lambda: nn.Linear(5, 7), 1, (6, 5)),
    ("linear-nobias", lambda: nn.Linear(5, 7, bias=False), 1, (6, 5)),
]

BATCH_NORMS = {
    ("torch", 1): nn.BatchNorm1d, ("torch", 2): nn.BatchNorm2d, ("torch", 3): nn.BatchNorm3d,
    ("fastbn", 1): fastbn.BatchNorm1d, ("fastbn", 2): fastbn.BatchNorm2d, ("fastbn", 3): fastbn.BatchNorm3d,
}


def assert_same_outputs(folded, original, x, dtype):
    with torch.no_grad():
        expected, actual = original(x), folded(x)
    tol = TOL[dtype]
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * expected.abs().max().item())


def layer_and_bn(producer, kind, affine, dtype, seed):
    _, make_layer, rank, _ = producer
    torch.manual_seed(seed)
    layer = make_layer()
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    model = nn.Sequential(layer, BATCH_NORMS[(kind, rank)](channels, affine=affine))
    return randomize_batch_norms(model, torch.Generator().manual_seed(seed)).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("kind", ["torch", "fastbn"])
@pytest.mark.parametrize("producer", PRODUCERS, ids=[p[0] for p in PRODUCERS])
def test_fold_matches_original(producer, kind, affine, dtype):
    seed = PRODUCERS.index(producer) * 4 + affine * 2 + (kind == "torch")
    model = layer_and_bn(producer, kind, affine, dtype, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(producer[3], generator=g, dtype=dtype)
    folded, report = fastbn.fold(model, return_report=True)
    assert report.folded == [("1", "0")] and report.left == [] and report.trace_error is None
    assert isinstance(folded[1], nn.Identity) and folded[0].bias is not None
    assert_same_outputs(folded, model, x, dtype)
    if x.dim() in (4, 5):  # the other memory format: channels_last input and weights
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        assert_same_outputs(folded.to(memory_format=fmt), model, x.contiguous(memory_format=fmt), dtype)


def small_resnet():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         BasicBlock(8, 8, 1), BasicBlock(8, 16, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 10), nn.BatchNorm1d(10))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_fold_resnet_every_bn(dtype, memory_format):
    g = torch.Generator().manual_seed(3)
    model = randomize_batch_norms(small_resnet(), g).to(dtype).to(memory_format=memory_format)
    fastbn.convert(model[3])  # a mix of torch's and fastbn's modules
    x = torch.randn(4, 3, 12, 12, generator=g, dtype=dtype).contiguous(memory_format=memory_format)
    folded, report = fastbn.fold(model, return_report=True)
    assert len(report.folded) == 7 and report.left == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert_same_outputs(folded, model.eval(), x, dtype)


def test_original_untouched_unless_inplace():
    g = torch.Generator().manual_seed(4)
    model = randomize_batch_norms(small_resnet(), g).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fastbn.fold(model)
    assert folded is not model and not folded.training
    assert model.training and isinstance(model[1], nn.BatchNorm2d)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    x = torch.randn(2, 3, 8, 8, generator=g)
    model.eval()
    expected = model(x)
    same = fastbn.fold(model, inplace=True)
    assert same is model and isinstance(model[1], nn.Identity)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


class SharedOutput(nn.Module):
    """Conv output used by the BatchNorm and by the residual add: folding would change the add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class SharedConv(nn.Module):
    """One conv called twice; folding the BatchNorm after the first call would change the second."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class SharedBatchNorm(nn.Module):
    """One BatchNorm module after two convs: replacing it by Identity would drop it from both."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 1)
        self.conv2 = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv1(x)) + self.bn(self.conv2(x))


class AfterFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(F.relu(self.conv(x)))


@pytest.mark.parametrize("model, reason", [
    (nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(), nn.BatchNorm2d(3)), "not the output of a Conv"),
    (AfterFunction(), "but of relu()"),
    (SharedOutput(), "is used 2 times"),
    (SharedConv(), "conv is called more than once"),
    (SharedBatchNorm(), "bn is called more than once"),
    (nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False)), "no running statistics"),
    (nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Identity(), nn.BatchNorm2d(3)), "Identity"),
    (nn.Sequential(nn.Conv2d(3, 3, 1), fastbn.BatchNormAct2d(3)), "fused with a residual add and 'relu'"),
], ids=["after-relu", "after-function", "output-used-twice", "conv-called-twice", "bn-called-twice",
        "no-running-stats", "after-identity", "fused-activation"])
def test_left_when_folding_would_change_the_model(model, reason):
    g = torch.Generator().manual_seed(5)
    model = randomize_batch_norms(model, g).eval()
    x = torch.randn(2, 3, 4, 4, generator=g)
    folded, report = fastbn.fold(model, return_report=True)
    assert any(reason in why for _, why in report.left), report
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


class Untraceable(nn.Module):
    """Python control flow on a tensor value: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
        self.head = nn.Sequential(nn.Linear(4, 5), fastbn.BatchNorm1d(5))

    def forward(self, x):
        y = self.features(x)
        if y.sum() > 0:
            y = -y
        return self.head(y.mean((2, 3)))


def test_sequential_fallback_for_untraceable_models():
    g = torch.Generator().manual_seed(6)
    model = randomize_batch_norms(Untraceable(), g).eval()
    x = torch.randn(3, 3, 6, 6, generator=g)
    folded, report = fastbn.fold(model, return_report=True)
    assert report.trace_error and "TraceError" in report.trace_error
    assert report.folded == [("features.1", "features.0"), ("head.1", "head.0")]
    assert [name for name, _ in report.left] == ["features.3"]
    assert_same_outputs(folded, model, x, torch.float32)


def test_example_inputs_check_where_channels_are():
    # A Linear over the last dimension of a 3-D input: BatchNorm1d's channels are dimension 1, not
    # the Linear's features, although both have 4 here. Only shape propagation can tell.
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    randomize_batch_norms(model, torch.Generator().manual_seed(7)).eval()
    x = torch.randn(2, 4, 3)
    folded, report = fastbn.fold(model, example_inputs=(x,), return_report=True)
    assert report.folded == [] and "channels are not BatchNorm's dimension 1" in report.left[0][1]
    torch.testing.assert_close(folded(x), model(x))
    folded, report = fastbn.fold(model, example_inputs=(torch.randn(2, 3),), return_report=True)
    assert report.folded == [("1", "0")]


def test_report_is_logged(caplog):
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.BatchNorm2d(3))
    with caplog.at_level(logging.INFO, logger="fastbn.fold"):
        fastbn.fold(model)
    assert "1 folded, 1 left" in caplog.text and "folded 1 into 0" in caplog.text and "left   3:" in caplog.text


def test_not_a_module():
    with pytest.raises(TypeError, match="expects an nn.Module"):
        fastbn.fold(lambda x: x)
