"""fuse(): BatchNorm -> activation and BatchNorm -> add -> activation patterns replaced by fastbn's
fused BatchNormAct modules, found with torch.fx."""
import operator
import warnings

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from . import modules
from .fold import _LeafTracer  # BatchNorms (fastbn's fused ones included) stay single nodes

__all__ = ["fuse"]

_FUSED = {nn.BatchNorm1d: modules.BatchNormAct1d, nn.BatchNorm2d: modules.BatchNormAct2d,
          nn.BatchNorm3d: modules.BatchNormAct3d, modules.BatchNorm1d: modules.BatchNormAct1d,
          modules.BatchNorm2d: modules.BatchNormAct2d, modules.BatchNorm3d: modules.BatchNormAct3d}
_ADDS = (operator.add, operator.iadd, torch.add)


def _activation(node, modules_by_name):
    """(name, parameter) of the activation `node` computes, or None. Modules, torch.* and F.* forms."""
    if node.op == "call_module":
        m = modules_by_name[node.target]
        if type(m) is nn.ReLU:
            return "relu", None
        if type(m) is nn.LeakyReLU:
            return "leaky_relu", m.negative_slope
        if type(m) is nn.ELU:
            return "elu", m.alpha
        if type(m) is nn.SiLU:
            return "silu", None
        return None
    if node.op == "call_function":
        if node.target in (F.relu, torch.relu, torch.relu_):
            return "relu", None
        if node.target in (F.leaky_relu, F.leaky_relu_):
            return "leaky_relu", node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
        if node.target in (F.elu, F.elu_):
            return "elu", node.kwargs.get("alpha", node.args[1] if len(node.args) > 1 else 1.0)
        if node.target is F.silu:
            return "silu", None
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu", None
    return None


def _only_user(node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def fuse(model):
    """Returns a torch.fx GraphModule of `model` in which every BatchNorm1d/2d/3d (torch's or fastbn's)
    followed by an activation (ReLU, LeakyReLU, ELU, SiLU as modules, torch.* or F.* calls), or by an
    addition and then an activation, is one fastbn BatchNormAct module computing act(BN(x) + other).
    The fused modules share the original Parameters and buffers; `model` itself is not changed.
    A model torch.fx cannot trace comes back unchanged, with a warning saying why.
    """
    try:
        graph = _LeafTracer().trace(model)
    except Exception as e:  # fx raises many kinds for untraceable code
        warnings.warn(f"fastbn.fuse: torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); returning it unchanged", stacklevel=2)
        return model
    gm = torch.fx.GraphModule(model, graph)
    modules_by_name = dict(gm.named_modules())
    calls = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(modules_by_name.get(node.target)) not in _FUSED:
            continue
        if calls[node.target] > 1 or len(node.args) != 1 or node.kwargs:
            continue  # a module called twice cannot become two different fused modules
        user = _only_user(node)
        if user is None:
            continue
        residual, act_node = None, user
        if user.op == "call_function" and user.target in _ADDS and len(user.args) == 2 and not user.kwargs:
            other = user.args[1] if user.args[0] is node else user.args[0]
            if not isinstance(other, torch.fx.Node) or other is node:
                continue
            residual, act_node = other, _only_user(user)
            if act_node is None:
                continue
        activation = _activation(act_node, modules_by_name)
        if activation is None:
            continue
        bn = modules_by_name[node.target]
        fused = modules._replacement(bn, _FUSED[type(bn)], activation=activation[0], activation_param=activation[1])
        gm.set_submodule(node.target, fused)
        modules_by_name[node.target] = fused
        if residual is not None:
            node.args = (node.args[0], residual)
            _move_after(node, residual)
        act_node.replace_all_uses_with(node)
        gm.graph.erase_node(act_node)
        if residual is not None:
            gm.graph.erase_node(user)
    gm.graph.lint()
    gm.recompile()
    return gm


def _move_after(node, dependency):
    """The fused call needs the residual: when the residual is computed after the BatchNorm (its branch
    comes later in the graph), the BatchNorm call moves after it."""
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    if order[dependency] > order[node]:
        dependency.append(node)
