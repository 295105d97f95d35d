"""fastbn.functional.batch_norm against torch's BatchNorm in float64, over dtypes x layouts x shapes."""
import pytest
import torch
import torch.nn.functional as F

from fastbn.functional import batch_norm, batch_norm_act
from conftest import (DTYPE_IDS, DTYPES, assert_close_to_reference, input_grad_scale, make_input, param_dtype_for,
                      shape_id, shape_layouts, stable_seed)


def test_worked_example():
    # The batch {1,2,3,4,5}: mean 3, biased variance 2.
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64).view(5, 1)
    y = batch_norm(x, None, None, training=True, eps=0.0 + 1e-12)
    expected = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=torch.float64) / 2.0 ** 0.5
    torch.testing.assert_close(y.flatten(), expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(y.flatten()[:2], torch.tensor([-1.41421356, -0.70710678], dtype=torch.float64),
                               rtol=0, atol=1e-8)


def _params(shape, dtype, affine, generator):
    if not affine:
        return None, None
    C = shape[1]
    pdt = param_dtype_for(dtype)
    weight = (torch.rand(C, generator=generator, dtype=torch.float64) + 0.5).to(pdt)
    bias = torch.randn(C, generator=generator, dtype=torch.float64).to(pdt)
    return weight, bias


def _leaf(t, requires_grad=True):
    if t is None:
        return None
    return t.detach().clone(memory_format=torch.preserve_format).requires_grad_(requires_grad)


def _as64(t):
    return _leaf(t.detach().double()) if t is not None else None


@pytest.mark.parametrize("shape, layout", shape_layouts())
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_backward_against_torch(shape, layout, dtype, training):
    g = torch.Generator().manual_seed(stable_seed(shape, layout, str(dtype), training))
    x = make_input(shape, dtype, layout, g, scale=2.0, shift=0.5)
    weight, bias = _params(shape, dtype, True, g)
    C = shape[1]
    stat_dtype = param_dtype_for(dtype)
    running_mean = torch.randn(C, generator=g, dtype=torch.float64).to(stat_dtype)
    running_var = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(stat_dtype)
    grad = make_input(shape, dtype, layout, g)

    def run(fn, x, weight, bias, rm, rv, grad):
        x, weight, bias = _leaf(x), _leaf(weight), _leaf(bias)
        y = fn(x, rm, rv, weight, bias, training=training, momentum=0.1, eps=1e-5)
        y.backward(grad)
        return y, x.grad, weight.grad, bias.grad, rm, rv

    ours = run(batch_norm, x, weight, bias, running_mean.clone(), running_var.clone(), grad)
    theirs = run(F.batch_norm, x, weight, bias, running_mean.clone(), running_var.clone(), grad)
    ref = run(F.batch_norm, x.double(), _as64(weight), _as64(bias), running_mean.double(), running_var.double(),
              grad.double())
    names = ["output", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var"]
    for name, a, t, r in zip(names, ours, theirs, ref):
        assert a.dtype == t.dtype, name
        scale = input_grad_scale(x, weight, grad) if name == "grad_input" and training else None
        assert_close_to_reference(a, t, r, dtype, name, scale)
    # The output and grad_input keep the input's memory format (channels_last stays channels_last).
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        assert ours[0].is_contiguous(memory_format=fmt) and ours[1].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("with_running", [True, False])
def test_options_float64(affine, with_running):
    g = torch.Generator().manual_seed(1)
    x = make_input((6, 5, 4, 3), torch.float64, "contiguous", g)
    weight, bias = _params(x.shape, torch.float64, affine, g)
    stats = (torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)) if with_running else (None, None)
    ref_stats = tuple(s.clone() if s is not None else None for s in stats)
    for step in range(3):
        xs = x + step
        y = batch_norm(xs, *stats, weight, bias, training=True, momentum=0.3)
        r = F.batch_norm(xs, *ref_stats, weight, bias, training=True, momentum=0.3)
        torch.testing.assert_close(y, r, rtol=1e-12, atol=1e-12)
    if with_running:
        torch.testing.assert_close(stats[0], ref_stats[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stats[1], ref_stats[1], rtol=1e-12, atol=1e-12)
        y = batch_norm(x, *stats, weight, bias, training=False)
        torch.testing.assert_close(y, F.batch_norm(x, *ref_stats, weight, bias, training=False), rtol=1e-12, atol=1e-12)


# each of input, weight, bias: absent (None), given without grad, or given with grad
PARAM_MODES = ["absent", "frozen", "trained"]


def assert_same_grads(ours, theirs, tensors, names, dy, tol):
    """Runs ours(*leaves) and theirs(*leaves) on fresh leaves made from `tensors` (None stays None,
    requires_grad kept), backpropagates dy through each, and compares the grads: the same ones
    computed (None where not asked for), equal to `tol`."""
    results = []
    for fn in (ours, theirs):
        leaves = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in tensors]
        fn(*leaves).backward(dy)
        results.append([t.grad if t is not None else None for t in leaves])
    for name, a, e in zip(names, *results):
        if e is None:
            assert a is None, f"grad_{name} computed though not asked for"
        else:
            torch.testing.assert_close(a, e, rtol=tol, atol=tol, msg=f"grad_{name}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("input_grad, weight_mode, bias_mode", [
    pytest.param(dx, w, b, id=f"{'dx' if dx else 'no-dx'}-weight-{w}-bias-{b}")
    for dx in (True, False) for w in PARAM_MODES for b in PARAM_MODES
    if dx or "trained" in (w, b)])  # (with none of them trained there is nothing to differentiate)
def test_grads_for_every_mix_of_given_and_trained_parameters(training, input_grad, weight_mode, bias_mode):
    """The grads match torch's whichever of input, weight and bias are absent or need no grad (the
    autograd kernel maps the grads it is asked for onto the tensors it was given)."""
    g = torch.Generator().manual_seed(stable_seed(training, input_grad, weight_mode, bias_mode))
    x = torch.randn(6, 5, 4, 3, generator=g, dtype=torch.float64)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)

    def param(mode, offset):
        t = torch.rand(5, generator=g, dtype=torch.float64) + offset
        return None if mode == "absent" else t.requires_grad_(mode == "trained")

    weight, bias = param(weight_mode, 0.5), param(bias_mode, -0.5)
    stats = torch.randn(5, generator=g, dtype=torch.float64), torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    def call(fn):
        return lambda x, w, b: fn(x, stats[0].clone(), stats[1].clone(), w, b, training=training)
    assert_same_grads(call(batch_norm), call(F.batch_norm), (x.requires_grad_(input_grad), weight, bias),
                      ["input", "weight", "bias"], dy, 1e-10)


@pytest.mark.parametrize("memory_efficient", [False, True], ids=["standard", "memory-efficient"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("input_grad, weight_mode, bias_mode, residual_mode", [
    pytest.param(dx, w, b, r, id=f"{'dx' if dx else 'no-dx'}-weight-{w}-bias-{b}-residual-{r}")
    for dx in (True, False) for w in PARAM_MODES for b in PARAM_MODES for r in PARAM_MODES
    if dx or "trained" in (w, b, r)])
def test_fused_grads_for_every_mix_of_given_and_trained_tensors(training, memory_efficient, input_grad, weight_mode,
                                                                 bias_mode, residual_mode):
    """As above for batch_norm_act, whose autograd also maps the residual's grad (leaky_relu, which
    memory-efficient mode can invert)."""
    g = torch.Generator().manual_seed(stable_seed(training, memory_efficient, input_grad, weight_mode, bias_mode,
                                                  residual_mode))
    x = torch.randn(6, 5, 4, 3, generator=g, dtype=torch.float64)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)

    def given(mode, make):
        t = make()
        return None if mode == "absent" else t.requires_grad_(mode == "trained")

    weight = given(weight_mode, lambda: torch.rand(5, generator=g, dtype=torch.float64) + 0.5)
    bias = given(bias_mode, lambda: torch.rand(5, generator=g, dtype=torch.float64) - 0.5)
    residual = given(residual_mode, lambda: torch.randn(x.shape, generator=g, dtype=torch.float64))
    stats = torch.randn(5, generator=g, dtype=torch.float64), torch.rand(5, generator=g, dtype=torch.float64) + 0.5

    def theirs(x, w, b, residual):
        z = F.batch_norm(x, stats[0].clone(), stats[1].clone(), w, b, training=training)
        return F.leaky_relu(z + residual if residual is not None else z, 0.1)

    def ours(x, w, b, residual):
        return batch_norm_act(x, stats[0].clone(), stats[1].clone(), w, b, training=training, activation="leaky_relu",
                              activation_param=0.1, residual=residual, memory_efficient=memory_efficient)
    assert_same_grads(ours, theirs, (x.requires_grad_(input_grad), weight, bias, residual),
                      ["input", "weight", "bias", "residual"], dy, 1e-9)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("why", ["nothing-requires-grad", "no_grad", "inference_mode"])
def test_calls_without_a_graph_record_none(training, why, fused):
    """Where nothing needs a grad the op skips its autograd node (a per-call saving): the output is
    torch's, carries no grad_fn, and a later call that does need one still gets it."""
    g = torch.Generator().manual_seed(stable_seed(training, why, fused))
    x = torch.randn(6, 5, 4, 3, generator=g, dtype=torch.float64)
    residual = torch.randn(6, 5, 4, 3, generator=g, dtype=torch.float64)
    weight = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(5, generator=g, dtype=torch.float64)
    stats = torch.randn(5, generator=g, dtype=torch.float64), torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    tracked = why != "nothing-requires-grad"
    args = [t.clone().requires_grad_(tracked) for t in (x, weight, bias, residual)]
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(why, torch.enable_grad)

    def ours():
        if fused:
            return batch_norm_act(args[0], stats[0].clone(), stats[1].clone(), args[1], args[2], training=training,
                                  residual=args[3])
        return batch_norm(args[0], stats[0].clone(), stats[1].clone(), args[1], args[2], training=training)

    with context():
        y = ours()
        expected = F.batch_norm(x, stats[0].clone(), stats[1].clone(), weight, bias, training=training)
        if fused:
            expected = F.relu(expected + residual)
    assert y.grad_fn is None and not y.requires_grad
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    if tracked:
        y = ours()
        assert y.requires_grad and y.grad_fn is not None


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_mode_ad_is_refused_not_dropped(training, fused):
    # No jvp is defined: a dual input must raise, not lose its tangent on the no-graph path.
    import torch.autograd.forward_ad as fwAD
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    fn = batch_norm_act if fused else batch_norm
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.randn_like(x))
        with pytest.raises(RuntimeError, match="jvp"):
            fn(dual, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), training=training)


# ---- grads of grads (create_graph=True) ----------------------------------------------------------

@pytest.mark.parametrize("shape, fmt", [
    ((6, 3), torch.contiguous_format), ((4, 3, 5), torch.contiguous_format), ((3, 2, 3, 4), torch.channels_last),
    ((2, 3, 2, 3, 2), torch.contiguous_format)], ids=["2d", "3d", "4d-cl", "5d"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("params", ["weight-bias", "weight", "none"])
def test_grads_of_grads(shape, fmt, training, params):
    """gradgradcheck: second derivatives against finite differences of the first (float64)."""
    g = torch.Generator().manual_seed(stable_seed(shape, training, params))
    x = torch.randn(shape, dtype=torch.float64, generator=g).contiguous(memory_format=fmt).requires_grad_()
    C = shape[1]
    weight = (torch.rand(C, dtype=torch.float64, generator=g) + 0.5).requires_grad_() if params != "none" else None
    bias = torch.randn(C, dtype=torch.float64, generator=g).requires_grad_() if params == "weight-bias" else None
    rm, rv = torch.randn(C, dtype=torch.float64, generator=g), torch.rand(C, dtype=torch.float64, generator=g) + 0.5
    inputs = [t for t in (x, weight, bias) if t is not None]

    def fn(x, *p):
        w, b = (list(p) + [None, None])[:2]
        return batch_norm(x, rm.clone(), rv.clone(), w, b, training=training)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("activation, param", [("identity", None), ("relu", None), ("leaky_relu", 0.2), ("elu", 0.7),
                                               ("silu", None)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_grads_of_grads(activation, param, training):
    g = torch.Generator().manual_seed(stable_seed(activation, training))
    shape = (3, 2, 3, 3)
    x, r = (torch.randn(shape, dtype=torch.float64, generator=g).requires_grad_() for _ in range(2))
    w = (torch.rand(2, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, generator=g).requires_grad_()
    rm, rv = torch.randn(2, dtype=torch.float64, generator=g), torch.rand(2, dtype=torch.float64, generator=g) + 0.5

    def fn(x, w, b, r):
        return batch_norm_act(x, rm.clone(), rv.clone(), w, b, training=training, activation=activation,
                              activation_param=param, residual=r)
    assert torch.autograd.gradgradcheck(fn, (x, w, b, r))


def test_gradient_penalty_matches_torch():
    """A WGAN-GP-style penalty, the usual reason for grads of grads: ||d out / d x||^2 differentiated
    again, against torch's BatchNorm + LeakyReLU."""
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(8, 4, 5, 5, dtype=torch.float64, generator=g)
    w0, b0 = torch.rand(4, dtype=torch.float64, generator=g) + 0.5, torch.randn(4, dtype=torch.float64, generator=g)

    def penalty_grads(norm):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        out = norm(x, w, b)
        (dx,) = torch.autograd.grad((out * out.detach().cos()).sum(), x, create_graph=True)
        dx.pow(2).sum().backward()
        return x.grad, w.grad, b.grad

    ours = penalty_grads(lambda x, w, b: batch_norm_act(x, None, None, w, b, True, activation="leaky_relu"))
    theirs = penalty_grads(lambda x, w, b: F.leaky_relu(F.batch_norm(x, None, None, w, b, True), 0.01))
    for name, a, e in zip(("x", "weight", "bias"), ours, theirs):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=name)


def test_grads_of_grads_refused_in_memory_efficient_mode():
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    y = batch_norm_act(x, None, None, w, None, True, activation="leaky_relu", memory_efficient=True)
    with pytest.raises(RuntimeError, match="memory_efficient=True does not keep"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


@pytest.mark.parametrize("shape, fmt", [((8, 4, 32, 32), torch.contiguous_format),
                                        ((8, 4, 32, 32), torch.channels_last), ((8192, 4), torch.contiguous_format)],
                         ids=["nchw", "channels_last", "2d"])
def test_large_mean_small_variance_is_stable(shape, fmt):
    # E[x^2] - E[x]^2 in float32 would return garbage here (the variance is 1e-8 of the mean squared).
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 1e-2 + 1e2).contiguous(memory_format=fmt)
    dims = [0] + list(range(2, len(shape)))
    xf = x.float()
    y = batch_norm(xf, None, None, training=True)
    ref = F.batch_norm(xf.double(), None, None, training=True)  # the float32 values, normalized exactly
    assert (y.double() - ref).abs().max().item() < 2e-3
    mean, var = xf.double().mean(dims), xf.double().var(dims, unbiased=False)
    _, m, v = torch.ops.fastbn.batch_norm_train(xf, None, None, 1e-5)
    torch.testing.assert_close(m.double(), mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(v.double(), var, rtol=1e-4, atol=0)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape, fmt", [((4, 40, 3, 3), torch.channels_last), ((64, 45), torch.contiguous_format)],
                         ids=["channels_last", "2d"])
def test_16bit_rows_large_mean_within_an_ulp(shape, fmt, dtype, training):
    # 16-bit rows normalize as x * scale + (bias - mean * scale) in float (half_rows_folded), whose
    # error grows with |mean| / std: at 300 every value must still be within one unit in the last
    # place of the exact result, plus the bound the kernel documents (2^-24 |mean| / std |weight|).
    g = torch.Generator().manual_seed(6)
    C = shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) + 300).to(dtype).contiguous(memory_format=fmt)
    weight = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(C, generator=g, dtype=torch.float64)
    rm, rv = torch.full((C,), 300.0, dtype=torch.float64), torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    y = batch_norm(x, rm.float(), rv.float(), weight.float(), bias.float(), training=training)
    exact = F.batch_norm(x.double(), rm.clone(), rv.clone(), weight, bias, training=training)
    dims = [0] + list(range(2, len(shape)))
    var = x.double().var(dims, unbiased=False) if training else rv
    scale = (weight / (var + 1e-5).sqrt()).view([1, C] + [1] * (len(shape) - 2))
    ulp = torch.finfo(dtype).eps * exact.abs()  # one unit where |exact| is in [2^k, 2^(k+1)) and up
    error = (y.double() - exact).abs()
    assert (error <= ulp + 4 * 2.0 ** -24 * 300 * scale).all()


@pytest.mark.parametrize("shape", [(8, 4, 32, 32), (3, 2, 70, 70), (16, 3, 7, 7)], ids=shape_id)
def test_outlier_at_each_block_start_is_stable(shape):
    # The float32 planes reduction sums each block about its first value. The worst case for that
    # shift is an outlier there: every plane starts with 1e6 in data of mean 1e2 and spread 1e-2.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 1e-2 + 1e2
    x.view(shape[0], shape[1], -1)[:, :, 0] = 1e6
    x[:, :, -1, -1] = -1e6  # and a second one that pulls the mean back
    xf = x.float()
    dims = [0, 2, 3]
    _, m, v = torch.ops.fastbn.batch_norm_train(xf, None, None, 1e-5)
    torch.testing.assert_close(m.double(), xf.double().mean(dims), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v.double(), xf.double().var(dims, unbiased=False), rtol=1e-6, atol=0)


def test_nan_and_inf_propagate_like_torch():
    x = torch.randn(4, 3, 5, 5)
    x[1, 0, 2, 2] = float("nan")
    x[2, 2, 0, 1] = float("inf")
    for training in (True, False):
        ours = batch_norm(x, torch.zeros(3), torch.ones(3), training=training)
        theirs = F.batch_norm(x, torch.zeros(3), torch.ones(3), training=training)
        assert torch.equal(ours.isnan(), theirs.isnan())
        assert torch.equal(ours.isinf(), theirs.isinf())
        finite = theirs.isfinite()
        torch.testing.assert_close(ours[finite], theirs[finite])


@pytest.mark.parametrize("shape", [(0, 3, 5), (0, 3), (4, 3, 0), (0, 2, 3, 3)], ids=shape_id)
def test_empty_batches_behave_like_torch(shape):
    C = shape[1]
    for training in (True, False):
        x = torch.randn(shape, requires_grad=True)
        rm, rv = torch.randn(C), torch.rand(C) + 0.5
        rm0, rv0 = rm.clone(), rv.clone()
        y = batch_norm(x, rm, rv, torch.ones(C), torch.zeros(C), training=training)
        ref = F.batch_norm(x, rm0.clone(), rv0.clone(), torch.ones(C), torch.zeros(C), training=training)
        assert y.shape == ref.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_half_input_with_half_parameters():
    g = torch.Generator().manual_seed(3)
    x = make_input((4, 6, 5, 5), torch.float16, "contiguous", g)
    w, b = torch.rand(6, generator=g).half() + 0.5, torch.randn(6, generator=g).half()
    ours = batch_norm(x, None, None, w, b, training=True)
    ref = F.batch_norm(x.double(), None, None, w.double(), b.double(), training=True)
    theirs = F.batch_norm(x, None, None, w, b, training=True)
    assert_close_to_reference(ours, theirs, ref, torch.float16, "output")


def test_zero_channels_give_empty_output():
    # torch's eval path raises IndexError here; fastbn returns the (empty) result in both modes.
    x = torch.randn(4, 0, 5, requires_grad=True)
    for training in (True, False):
        y = batch_norm(x, torch.zeros(0), torch.ones(0), training=training)
        assert y.shape == x.shape
        y.sum().backward()


@pytest.mark.parametrize("shape, layout", shape_layouts())
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sync_pieces_make_up_training(shape, layout, dtype):
    """SyncBatchNorm's ops on one process: batch_norm_stats, batch_norm_eval at those statistics and
    batch_norm_backward_elemt at the batch's own means of dy and dy * x_hat are the training forward
    and backward (statistics bit for bit; output and grad_input against the float64 reference)."""
    ops = torch.ops.fastbn
    g = torch.Generator().manual_seed(stable_seed(shape, layout, str(dtype)))
    x = make_input(shape, dtype, layout, g, scale=2.0, shift=0.5)
    weight, bias = _params(shape, dtype, True, g)
    grad = make_input(shape, dtype, layout, g)
    out, mean, var = ops.batch_norm_train(x, weight, bias, 1e-5)
    stats = ops.batch_norm_stats(x)
    assert torch.equal(stats[0], mean) and torch.equal(stats[1], var)
    normalized = ops.batch_norm_eval(x, weight, bias, mean, var, 1e-5)
    _, sum_dy_xhat, sum_dy = ops.batch_norm_backward(grad, x, weight, mean, var, 1e-5, False, [False, True, True])
    count = x.numel() // shape[1]
    grad_input = ops.batch_norm_backward_elemt(grad, x, weight, mean, var, 1e-5, sum_dy / count, sum_dy_xhat / count)
    trained = ops.batch_norm_backward(grad, x, weight, mean, var, 1e-5, True, [True, False, False])[0]
    x64 = _leaf(x.double())
    out64 = F.batch_norm(x64, None, None, weight.double(), bias.double(), True)
    out64.backward(grad.double())
    assert_close_to_reference(normalized, out, out64, dtype, "output")
    assert_close_to_reference(grad_input, trained, x64.grad, dtype, "grad_input", input_grad_scale(x, weight, grad))
    assert grad_input.stride() == trained.stride()
