"""Bad input: torch's exception types and words, no crash, running statistics untouched."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbn
from fastbn.functional import batch_norm


def _raises_like_torch(call_ours, call_torch, match):
    """Both raise the same exception type, and fastbn's message carries `match`."""
    with pytest.raises(Exception) as theirs:
        call_torch()
    with pytest.raises(type(theirs.value), match=match):
        call_ours()


@pytest.mark.parametrize("module, shape, message", [
    (fastbn.BatchNorm1d, (2, 3, 4, 5), "expected 2D or 3D input \\(got 4D input\\)"),
    (fastbn.BatchNorm2d, (2, 3, 4), "expected 4D input \\(got 3D input\\)"),
    (fastbn.BatchNorm3d, (2, 3, 4, 5), "expected 5D input \\(got 4D input\\)"),
])
def test_wrong_rank_per_module(module, shape, message):
    m = module(3)
    with pytest.raises(ValueError, match=message):
        m(torch.randn(shape))
    assert int(m.num_batches_tracked) == 0


def test_one_value_per_channel_when_training():
    for shape in [(1, 3), (1, 3, 1), (1, 3, 1, 1)]:
        x = torch.randn(shape)
        _raises_like_torch(lambda: batch_norm(x, None, None, training=True),
                           lambda: F.batch_norm(x, None, None, training=True),
                           "Expected more than 1 value per channel when training")
        batch_norm(x, torch.zeros(3), torch.ones(3), training=False)  # fine in eval, as in torch
    bn = fastbn.BatchNorm1d(3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bn(torch.randn(1, 3))
    assert torch.equal(bn.running_mean, torch.zeros(3)) and int(bn.num_batches_tracked) == 0


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_parameter_of_wrong_size(name, training):
    x = torch.randn(4, 3, 5)
    args = {"running_mean": torch.zeros(3), "running_var": torch.ones(3), "weight": torch.ones(3),
            "bias": torch.zeros(3)}
    args[name] = torch.ones(4)
    before = {k: v.clone() for k, v in args.items()}
    _raises_like_torch(lambda: batch_norm(x, training=training, **args),
                       lambda: F.batch_norm(x, training=training, **{k: v.clone() for k, v in before.items()}),
                       f"{name} should contain 3 elements not 4")
    for k in args:  # nothing was written
        assert torch.equal(args[k], before[k]), k


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_non_floating_input(dtype):
    x = torch.ones(4, 3, dtype=dtype)
    _raises_like_torch(lambda: batch_norm(x, torch.zeros(3), torch.ones(3), training=True),
                       lambda: F.batch_norm(x, torch.zeros(3), torch.ones(3), training=True),
                       "\"batch_norm\" not implemented for")


def test_mixed_parameter_dtype():
    x = torch.randn(4, 3)
    _raises_like_torch(lambda: batch_norm(x, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)),
                       lambda: F.batch_norm(x, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)),
                       "mixed dtype \\(CPU\\): expect parameter to have scalar type of Float")


@pytest.mark.parametrize("eps, training, message", [
    (-1.0, True, "batch_norm eps must be positive during training, but got -1.0"),
    (0.0, True, "batch_norm eps must be positive during training, but got 0.0"),
    (-1e-5, False, "batch_norm eps must be non-negative, but got -1e-05"),
])
def test_bad_eps(eps, training, message):
    x = torch.randn(4, 3)
    rm, rv = torch.zeros(3), torch.ones(3)
    _raises_like_torch(lambda: batch_norm(x, rm, rv, training=training, eps=eps),
                       lambda: F.batch_norm(x, rm.clone(), rv.clone(), training=training, eps=eps), message)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


def test_eval_without_running_stats():
    x = torch.randn(4, 3)
    _raises_like_torch(lambda: batch_norm(x, None, None, training=False),
                       lambda: F.batch_norm(x, None, None, training=False),
                       "running_mean must be defined in evaluation mode")


def test_input_with_fewer_than_two_dimensions():
    with pytest.raises(RuntimeError, match="expected input with at least 2 dimensions"):
        batch_norm(torch.randn(3), None, None, training=True)


def test_failed_module_call_leaves_running_stats_untouched():
    bn = fastbn.BatchNorm2d(3)
    bn(torch.randn(4, 3, 2, 2))
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    bn.running_var = torch.ones(5)  # corrupt on purpose: the update must refuse before writing
    with pytest.raises(RuntimeError, match="running_var should contain 3 elements not 5"):
        bn(torch.randn(4, 3, 2, 2))
    assert torch.equal(bn.running_mean, state["running_mean"])
    assert torch.equal(bn.num_batches_tracked, state["num_batches_tracked"])
    with pytest.raises(NotImplementedError):
        fastbn.BatchNorm2d(3)(torch.ones(4, 3, 2, 2, dtype=torch.int64))


def test_backward_shape_mismatch_is_an_error():
    x = torch.randn(4, 3, 5)
    _, mean, var = torch.ops.fastbn.batch_norm_train(x, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="grad_output has shape"):
        torch.ops.fastbn.batch_norm_backward(torch.randn(4, 3, 6), x, None, mean, var, 1e-5, True, [True, True, True])


def test_modules_reject_like_torch_modules():
    for fast, ref in [(fastbn.BatchNorm1d(3), nn.BatchNorm1d(3)), (fastbn.BatchNorm2d(3), nn.BatchNorm2d(3))]:
        for shape in [(4,), (4, 3, 2, 2, 2)]:
            _raises_like_torch(lambda: fast(torch.randn(shape)), lambda: ref(torch.randn(shape)), "expected")
