"""torch.export of models using fastbn modules: the custom ops export through their fake kernels, in
eval and in training mode (where the running statistics are mutated buffers)."""
import copy

import pytest
import torch
from torch import nn

import fastbn


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), fastbn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 5 * 5, 6), fastbn.BatchNorm1d(6, momentum=None))


def fastbn_ops(program):
    """The fastbn ops called by the program, seen through auto_functionalized wrappers (which carry
    the mutating op as their first argument once decompositions have run)."""
    targets = [n.args[0] if str(n.target).startswith("auto_functionalized") else n.target
               for n in program.graph.nodes if n.op == "call_function"]
    return sorted({str(t) for t in targets if str(t).startswith("fastbn.")})


@pytest.mark.parametrize("decompose", [False, True], ids=["export", "run_decompositions"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_export_matches_eager(training, decompose):
    model = make_model().train(training)
    with torch.no_grad():  # running statistics that are not the initial ones
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(5, 3, 7, 7)
    exported_model = copy.deepcopy(model)
    program = torch.export.export(exported_model, (x,))
    if decompose:
        program = program.run_decompositions()
    assert fastbn_ops(program) == (["fastbn.batch_norm_train.default", "fastbn.update_running_stats.default"]
                                   if training else ["fastbn.batch_norm_eval.default"])
    module = program.module()
    for step in range(2):  # twice: the second step sees the running statistics the first one wrote
        x = torch.randn(5, 3, 7, 7, generator=torch.Generator().manual_seed(step))
        expected = model(x)
        actual = module(x)
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(dict(module.named_buffers())[name], buffer, rtol=1e-6, atol=1e-6, msg=name)


def test_export_with_dynamic_batch():
    model = make_model().eval()
    batch = torch.export.Dim("batch", min=2, max=64)
    program = torch.export.export(model, (torch.randn(4, 3, 7, 7),), dynamic_shapes=({0: batch},))
    x = torch.randn(9, 3, 7, 7)
    torch.testing.assert_close(program.module()(x), model(x), rtol=1e-6, atol=1e-6)
