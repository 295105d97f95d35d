"""Fused BatchNorm + residual + activation: exactly the composite torch computes, for every
activation, residual, layout, mode and dtype; memory-efficient mode; modules, fuse() and memory."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbn
from fastbn.functional import batch_norm_act
from fastbn.bench.fused import MEMORY_VARIANTS, conv_bn_act_stack, saved_activation_bytes
from conftest import (DTYPE_IDS, DTYPES, BasicBlock, Bottleneck, assert_backward_gives_exactly_the_grads_asked_for,
                      assert_close_to_reference, make_input, param_dtype_for, randomize_batch_norms, shape_id,
                      stable_seed)

ACTIVATIONS = {
    "identity": (None, lambda z, p: z),
    "relu": (None, lambda z, p: F.relu(z)),
    "leaky_relu": (0.2, lambda z, p: F.leaky_relu(z, p)),
    "elu": (0.7, lambda z, p: F.elu(z, p)),
    "silu": (None, lambda z, p: F.silu(z)),
}
INVERTIBLE = ("identity", "leaky_relu")
SHAPES = [(7, 3), (3, 5, 7), (4, 3, 5, 5), (2, 3, 2, 3, 5), (2, 1, 1, 1), (5, 17, 3, 3)]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def composite(x, running_mean, running_var, weight, bias, training, activation, param, residual):
    """torch's own BatchNorm, add and activation, one after the other."""
    z = F.batch_norm(x, running_mean, running_var, weight, bias, training, 0.1, 1e-5)
    if residual is not None:
        z = z + residual
    return ACTIVATIONS[activation][1](z, param)


def _leaf(t):
    return None if t is None else t.detach().clone(memory_format=torch.preserve_format).requires_grad_()


def run(fn, x, weight, bias, residual, running_mean, running_var, grad, **kwargs):
    """Output, grads of input, weight, bias and residual, and the running statistics after one call."""
    x, weight, bias, residual = _leaf(x), _leaf(weight), _leaf(bias), _leaf(residual)
    rm, rv = running_mean.clone(), running_var.clone()
    y = fn(x, rm, rv, weight, bias, residual=residual, **kwargs)
    y.backward(grad)
    return [y, x.grad, weight.grad, bias.grad, residual.grad if residual is not None else None, rm, rv]


def cases():
    return [pytest.param(shape, layout, id=f"{shape_id(shape)}-{layout}") for shape in SHAPES for layout in LAYOUTS
            if layout != "channels_last" or len(shape) in (4, 5)]


def make_case(shape, layout, dtype, seed, weight_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    pdt = param_dtype_for(dtype)
    x = make_input(shape, dtype, layout, g, scale=2.0, shift=0.5)
    residual = make_input(shape, dtype, layout, g)
    grad = make_input(shape, dtype, layout, g)
    weight = ((torch.rand(C, generator=g, dtype=torch.float64) + 0.5) * weight_scale).to(pdt)
    bias = torch.randn(C, generator=g, dtype=torch.float64).to(pdt)
    running_mean = torch.randn(C, generator=g, dtype=torch.float64).to(pdt)
    running_var = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(pdt)
    return x, weight, bias, residual, running_mean, running_var, grad


NAMES = ["output", "grad_input", "grad_weight", "grad_bias", "grad_residual", "running_mean", "running_var"]


# Memory-efficient mode takes the invertible activations only (test_memory_efficient_refuses_... checks the rest).
MODES = [pytest.param(a, me, id=f"{a}-{'memory-efficient' if me else 'standard'}")
         for a in ACTIVATIONS for me in (False, True) if not me or a in INVERTIBLE]


@pytest.mark.parametrize("shape, layout", cases())
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation, memory_efficient", MODES)
def test_float64_equals_composite(activation, memory_efficient, training, with_residual, shape, layout):
    x, weight, bias, residual, rm, rv, grad = make_case(shape, layout, torch.float64, stable_seed(shape, layout))
    residual = residual if with_residual else None
    param = ACTIVATIONS[activation][0]
    ours = run(batch_norm_act, x, weight, bias, residual, rm, rv, grad, training=training, activation=activation,
               activation_param=param, memory_efficient=memory_efficient)
    ref = run(lambda *a, residual: composite(*a, training, activation, param, residual),
              x, weight, bias, residual, rm, rv, grad)
    for name, a, r in zip(NAMES, ours, ref):
        if r is None:
            assert a is None, name
            continue
        torch.testing.assert_close(a, r, rtol=0, atol=1e-9 * max(1.0, r.abs().max().item()), msg=name)
    if layout != "strided":  # the output keeps the input's memory format
        assert ours[0].stride() == x.stride() and ours[1].stride() == x.stride()


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float64],
                         ids=[i for d, i in zip(DTYPES, DTYPE_IDS) if d != torch.float64])
@pytest.mark.parametrize("activation, memory_efficient", [("relu", False), ("leaky_relu", False), ("elu", False),
                                                          ("silu", False), ("leaky_relu", True), ("identity", True)])
@pytest.mark.parametrize("shape, layout", [((4, 16, 9, 9), "contiguous"), ((4, 16, 9, 9), "channels_last"),
                                           ((300, 24), "contiguous"), ((2, 3, 70, 70), "contiguous")],
                         ids=["nchw", "nhwc", "rows", "long-planes"])
def test_reduced_precision_against_float64(shape, layout, activation, memory_efficient, dtype):
    """fp32/fp16/bf16: fastbn's error against the float64 composite is at most twice that of torch's
    composite in the same dtype (or 32 units in the last place)."""
    x, weight, bias, residual, rm, rv, grad = make_case(shape, layout, dtype, 11)
    param = ACTIVATIONS[activation][0]
    kwargs = dict(training=True, activation=activation, activation_param=param)
    ours = run(batch_norm_act, x, weight, bias, residual, rm, rv, grad, memory_efficient=memory_efficient, **kwargs)
    theirs = run(lambda *a, residual: composite(*a, True, activation, param, residual),
                 x, weight, bias, residual, rm, rv, grad)
    ref = run(lambda *a, residual: composite(*a, True, activation, param, residual),
              *[t.double() for t in (x, weight, bias, residual, rm, rv, grad)])
    for name, a, t, r in zip(NAMES, ours, theirs, ref):
        assert a.dtype == t.dtype, name
        assert_close_to_reference(a, t, r, dtype, name)


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_memory_efficient_with_weight_at_and_near_zero(with_residual):
    """Channels whose weight is 0 (zero-initialized residual branches) or tiny next to the bias keep
    their input: the output carries nothing about it there, yet grad_weight needs it."""
    x, weight, bias, residual, rm, rv, grad = make_case((4, 6, 5, 5), "contiguous", torch.float64, 5)
    weight = torch.tensor([0.0, 1e-9, 0.8, -0.5, 1e-3, 0.0], dtype=torch.float64)
    bias = torch.tensor([0.3, 2.0, -0.1, 0.0, 0.5, 0.0], dtype=torch.float64)
    residual = residual if with_residual else None
    kwargs = dict(training=True, activation="leaky_relu", activation_param=0.1)
    ours = run(batch_norm_act, x, weight, bias, residual, rm, rv, grad, memory_efficient=True, **kwargs)
    ref = run(lambda *a, residual: composite(*a, True, "leaky_relu", 0.1, residual), x, weight, bias, residual, rm, rv,
              grad)
    for name, a, r in zip(NAMES, ours, ref):
        if r is not None:
            torch.testing.assert_close(a, r, rtol=0, atol=1e-9 * max(1.0, r.abs().max().item()), msg=name)
    assert ours[2][0].abs() > 0  # a zero weight still gets its gradient


def test_memory_efficient_refuses_what_cannot_be_inverted():
    x = torch.randn(4, 3)
    for activation in ("relu", "elu", "silu"):
        with pytest.raises(ValueError, match="memory_efficient=True recovers the input from the output"):
            batch_norm_act(x, None, None, training=True, activation=activation, memory_efficient=True)
    with pytest.raises(ValueError, match="positive leaky_relu slope"):
        batch_norm_act(x, None, None, training=True, activation="leaky_relu", activation_param=0.0,
                       memory_efficient=True)
    with pytest.raises(ValueError, match="activation must be one of identity, relu"):
        batch_norm_act(x, None, None, training=True, activation="gelu")
    with pytest.raises(ValueError, match="takes no activation_param"):
        batch_norm_act(x, None, None, training=True, activation="relu", activation_param=0.1)
    with pytest.raises(RuntimeError, match="residual has shape"):
        batch_norm_act(x, None, None, training=True, residual=torch.randn(4, 2))
    with pytest.raises(RuntimeError, match="residual has dtype"):
        batch_norm_act(x, None, None, training=True, residual=torch.randn(4, 3, dtype=torch.float64))


def test_running_stats_untouched_by_a_failed_call():
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(RuntimeError, match="residual has shape"):
        batch_norm_act(torch.randn(4, 3), rm, rv, training=True, residual=torch.randn(4, 4))
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


ops = torch.ops.fastbn


@pytest.mark.parametrize("shape, fmt", [((5, 3), torch.contiguous_format), ((2, 3, 4, 5), torch.channels_last)],
                         ids=["2d", "4d-cl"])
def test_opcheck_and_gradcheck(shape, fmt):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, dtype=torch.float64, generator=g).contiguous(memory_format=fmt)
    r = torch.randn(shape, dtype=torch.float64, generator=g).contiguous(memory_format=fmt)
    w = torch.rand(shape[1], dtype=torch.float64, generator=g) + 0.5
    b = torch.randn(shape[1], dtype=torch.float64, generator=g)
    rm, rv = torch.zeros(shape[1], dtype=torch.float64), torch.ones(shape[1], dtype=torch.float64)
    for code, param in ((1, 0.0), (2, 0.1), (3, 1.0), (4, 0.0)):
        torch.library.opcheck(ops.batch_norm_act_train, (x, w, b, r, 1e-5, code, param, False))
        torch.library.opcheck(ops.batch_norm_act_eval, (x, w, b, None, rm, rv, 1e-5, code, param, False))
        y, mean, var = ops.batch_norm_act_train(x, w, b, r, 1e-5, code, param, False)
        torch.library.opcheck(ops.batch_norm_act_backward, (torch.randn_like(y), x, False, w, b, r, mean, var, 1e-5,
                                                            True, code, param, [True, True, True, True]))
    leaves = [t.clone().requires_grad_() for t in (x, w, b, r)]
    for activation, param, me in (("relu", None, False), ("silu", None, False), ("leaky_relu", 0.1, True)):
        def fn(x, w, b, r):
            return batch_norm_act(x, None, None, w, b, True, activation=activation, activation_param=param,
                                  residual=r, memory_efficient=me)
        assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("memory_efficient", [False, True], ids=["standard", "memory-efficient"])
def test_torch_compile_fullgraph(memory_efficient):
    torch._dynamo.reset()
    m = fastbn.BatchNormAct2d(4, activation="leaky_relu", memory_efficient=memory_efficient).double()
    ref = fastbn.BatchNormAct2d(4, activation="leaky_relu", memory_efficient=memory_efficient).double()
    compiled = torch.compile(m, fullgraph=True)
    x, r = torch.randn(3, 4, 5, 5, dtype=torch.float64), torch.randn(3, 4, 5, 5, dtype=torch.float64)
    for mode in ("train", "eval"):
        m.train(mode == "train"), ref.train(mode == "train")
        torch.testing.assert_close(compiled(x, r), ref(x, r))
    torch.testing.assert_close(m.running_var, ref.running_var)


# ---- modules ----------------------------------------------------------------------------------------

def test_module_is_a_batch_norm_with_the_same_state_dict():
    m = fastbn.BatchNormAct2d(5, activation="elu", activation_param=0.5)
    assert isinstance(m, fastbn.BatchNorm2d) and isinstance(m, nn.BatchNorm2d)
    assert m.state_dict().keys() == nn.BatchNorm2d(5).state_dict().keys()
    assert "activation='elu', activation_param=0.5" in repr(m)
    assert fastbn.BatchNormAct1d(3, activation="leaky_relu").activation_param == 0.01
    with pytest.raises(ValueError, match="memory_efficient=True recovers"):
        fastbn.BatchNormAct3d(3, memory_efficient=True)  # relu by default
    with pytest.raises(ValueError, match="expected 4D input"):
        m(torch.randn(2, 5))
    x, r = torch.randn(4, 5, 3, 3), torch.randn(4, 5, 3, 3)
    ref = nn.BatchNorm2d(5)
    torch.testing.assert_close(m(x, r), F.elu(ref(x) + r, 0.5))
    torch.testing.assert_close(m.running_mean, ref.running_mean)
    assert int(m.num_batches_tracked) == 1


# ---- fuse -----------------------------------------------------------------------------------------

def _trained_like(model):
    return randomize_batch_norms(model, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("block", ["basic", "basic-downsample", "bottleneck"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fuse_resnet_blocks(block, training):
    torch.manual_seed(0)
    model = {"basic": lambda: BasicBlock(8, 8), "basic-downsample": lambda: BasicBlock(8, 16, 2),
             "bottleneck": lambda: Bottleneck(16, 4, 2)}[block]()
    model = _trained_like(model).double().train(training)
    reference = _trained_like({"basic": lambda: BasicBlock(8, 8), "basic-downsample": lambda: BasicBlock(8, 16, 2),
                            "bottleneck": lambda: Bottleneck(16, 4, 2)}[block]()).double().train(training)
    reference.load_state_dict(model.state_dict())
    fused = fastbn.fuse(model)
    bns = [m for m in fused.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    acts = [m for m in bns if isinstance(m, fastbn.modules._BatchNormAct)]
    # Every BatchNorm followed by an activation, or by the residual add and an activation, is fused;
    # only the downsample's stays plain: its output is the other operand of that add.
    has_downsample = block != "basic"
    assert len(acts) == len(bns) - has_downsample
    # no activation left over: neither ReLU modules nor relu calls
    assert not [n for n in fused.graph.nodes if n.op == "call_module" and isinstance(fused.get_submodule(n.target),
                                                                                     nn.ReLU)]
    assert not [n for n in fused.graph.nodes if n.op == "call_function" and n.target in (F.relu, torch.relu)]
    x = torch.randn(2, model.conv1.in_channels, 8, 8, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = fused(x), reference(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-9)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-9)
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=0, atol=1e-9, msg=name)
    for name, buf in model.named_buffers():  # shared with the fused modules
        torch.testing.assert_close(buf, dict(reference.named_buffers())[name], rtol=0, atol=1e-12, msg=name)


def test_fuse_activation_kinds_and_parameters():
    model = nn.Sequential(nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4), nn.LeakyReLU(0.3), nn.Conv1d(4, 4, 1),
                          fastbn.BatchNorm1d(4), nn.ELU(0.4), nn.Conv1d(4, 4, 1), nn.BatchNorm1d(4), nn.SiLU(),
                          nn.BatchNorm1d(4), nn.Tanh())
    fused = fastbn.fuse(model)
    kinds = [(m.activation, m.activation_param) for m in fused.modules() if isinstance(m, fastbn.modules._BatchNormAct)]
    assert kinds == [("leaky_relu", 0.3), ("elu", 0.4), ("silu", None)]
    assert type(fused.get_submodule("9")) is nn.BatchNorm1d  # before a Tanh: left alone
    x = torch.randn(5, 3, 6)
    torch.testing.assert_close(fused(x), model(x))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return F.relu(self.bn(x)) if x.sum() > 0 else x


def test_fuse_untraceable_model_comes_back_unchanged():
    model = Untraceable()
    with pytest.warns(UserWarning, match="torch.fx cannot trace Untraceable"):
        assert fastbn.fuse(model) is model


# ---- memory -----------------------------------------------------------------------------------------

def test_memory_efficient_saves_at_least_half():
    """Autograd-saved activations of 10 x (Conv -> BN -> LeakyReLU): torch's modules save the BN input,
    the LeakyReLU input and its output; the memory-efficient fused module saves its output only."""
    torch.manual_seed(0)
    x = torch.randn(8, 16, 16, 16)
    saved = {name: saved_activation_bytes(conv_bn_act_stack(make, channels=16), x)
             for name, make in MEMORY_VARIANTS.items()}
    theirs, fused, ours = saved.values()
    tensor = x.numel() * x.element_size()
    # in tensors of x's size (the per-channel statistics add a few KB): 3 per layer, 2, and 1 (+ the input)
    assert [round(b / tensor) for b in (theirs, fused, ours)] == [30, 20, 11]
    assert ours <= 0.5 * theirs


@pytest.mark.parametrize("mask", [m for m in range(1, 16)], ids=lambda m: f"mask{m:04b}")
@pytest.mark.parametrize("shape, layout", [((4, 6, 5, 5), "contiguous"), ((4, 6, 5, 5), "channels_last"),
                                           ((40, 6), "contiguous")], ids=["nchw", "nhwc", "rows"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_backward_returns_exactly_the_grads_asked_for(mask, shape, layout, with_residual):
    """Every subset of (input, weight, bias, residual) grads equals the same grads computed all at
    once (which the tests above check against torch): e.g. a frozen input with a trained residual."""
    x, weight, bias, residual, _, _, dy = make_case(shape, layout, torch.float64, 5)
    assert_backward_gives_exactly_the_grads_asked_for(x, dy, weight, bias, residual if with_residual else None, mask)
