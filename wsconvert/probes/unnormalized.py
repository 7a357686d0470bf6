"""Find the convolutions whose output does not feed a normalization layer.

Weight Standardization (arXiv:1903.10520) fixes every filter to zero mean and unit variance, so a
standardized conv can no longer choose the scale of its output. Before a normalization layer that is
harmless: the norm divides the scale out again and its affine parameters set a new one. Anywhere else
(squeeze-excitation convs, output heads, a patch embedding added to a position embedding, a residual
branch summed without a norm) the scale mattered, and standardizing can hurt; Composer had to exclude the
last 15 convs of DeepLabv3+ for this reason (MosaicML Composer PR #1562).

Rule. A conv is *normalized* when every path from its output reaches a normalization layer through
operations that are positively homogeneous of degree one in that output, f(s * y) = s * f(y) for s > 0:
shape and layout ops (view, reshape, permute, flatten, slicing, cat, split, padding), dropout, ReLU,
LeakyReLU, PReLU, max/average pooling, mean and linear interpolation. Such ops carry a scale through
unchanged, and the norm then removes it. So ``conv -> ReLU -> BatchNorm`` counts as normalized, while
``conv -> SiLU -> conv``, ``conv -> sigmoid``, ``conv + x`` and a conv whose output is returned by the
model do not. A conv called several times must be normalized at every call.

Normalization layers (``NORM_TYPES``): torch's BatchNorm/SyncBatchNorm (and subclasses such as timm's
BatchNormAct2d), GroupNorm (including the GroupNorm/GroupNormAct that conversion produces), LayerNorm
(timm's LayerNorm2d, LayerNormAct), InstanceNorm, RMSNorm; torchvision's and timm's FrozenBatchNorm2d;
timm's FrozenBatchNormAct2d, RmsNorm*, SimpleNorm* and EvoNorm layers. The functional forms
(``F.batch_norm``, ``F.group_norm``, ``F.layer_norm``, ``F.instance_norm``, ``F.rms_norm``) count too.
LocalResponseNorm does not (it is not scale-invariant).

Two methods, tried in order:

1. ``"fx"``: ``torch.fx`` symbolic tracing, with convs and norm layers kept as leaves; follows each conv
   node's users through the ops above. Needs no input, but fails on data-dependent control flow.
2. ``"hooks"``: runs the model once on ``example_inputs`` (eval mode, no grad, training flags restored),
   tags each conv's output tensor with a forward hook, carries the tags through the ops above with a
   ``TorchFunctionMode``, and records what consumes them; norm modules are recognized by a forward
   pre-hook. Needs an input, works with any Python control flow.

When neither works the result is ``"unavailable"`` with the reasons; nothing is raised.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..errors import InvalidOptionError, ProbeUnavailableWarning

__all__ = [
    "INPUT_FIX",
    "METHODS",
    "NORM_FUNCTIONS",
    "SCALE_PRESERVING_OPS",
    "ProbeResult",
    "is_norm_layer",
    "norm_types",
    "probe_unnormalized",
    "resolve_example_inputs",
]

# What to do when a check needs a forward pass and has none (or the trace failed): said by warnings and hints.
SKIPPED_NOTHING = "skip_unnormalized=True skipped nothing"  # starts that warning; the CLI says it once
INPUT_FIX = (
    "give an input the model runs on: example_inputs=(tensor,) or input_shape=(1, 3, 224, 224) "
    "(CLI --input-shape 1,3,224,224)"
)

NORM_FUNCTIONS = frozenset(
    {
        "batch_norm",
        "group_norm",
        "layer_norm",
        "instance_norm",
        "rms_norm",
        "native_batch_norm",
        "native_group_norm",
        "native_layer_norm",
    }
)

# Functions and Tensor methods (by name) that are positively homogeneous of degree one: they carry the
# conv's output scale to the next op unchanged.
SCALE_PRESERVING_OPS = frozenset(
    {
        # shape, layout, dtype and selection
        "view", "view_as", "reshape", "reshape_as", "permute", "transpose", "swapaxes", "movedim", "moveaxis",
        "contiguous", "flatten", "unflatten", "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "clone",
        "to", "float", "double", "half", "bfloat16", "type_as", "getitem", "__getitem__", "chunk", "split",
        "tensor_split", "unbind", "cat", "concat", "concatenate", "stack", "pad", "pixel_shuffle",
        "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle", "roll",
        # identity in eval, a per-element rescale in training
        "dropout", "dropout1d", "dropout2d", "dropout3d", "identity",
        # positively homogeneous activations and reductions
        "relu", "relu_", "leaky_relu", "leaky_relu_", "prelu",
        "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
        "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
        "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
        "adaptive_max_pool3d", "mean", "interpolate", "upsample", "upsample_nearest", "upsample_bilinear",
    }
)  # fmt: skip

# Ops that only read metadata (their result holds no tensor data derived from the values).
_METADATA_OPS = frozenset({"getattr", "size", "dim", "numel", "__get__", "__len__", "shape", "dtype", "device"})

_SCALE_PRESERVING_MODULES: tuple[type, ...] = (
    nn.Identity,
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Flatten,
    nn.Unflatten,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
    nn.ReflectionPad1d,
    nn.ReflectionPad2d,
    nn.ReflectionPad3d,
    nn.ReplicationPad1d,
    nn.ReplicationPad2d,
    nn.ReplicationPad3d,
    nn.Upsample,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.ChannelShuffle,
)

_TORCH_NORMS: tuple[type, ...] = (_BatchNorm, nn.GroupNorm, nn.LayerNorm, _InstanceNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)

_OPTIONAL_NORMS = {
    "torchvision.ops.misc": ("FrozenBatchNorm2d",),
    "timm.layers.norm_act": ("FrozenBatchNorm2d", "FrozenBatchNormAct2d", "RmsNormAct", "RmsNormAct2d"),
    "timm.layers.norm": ("RmsNorm", "RmsNorm2d", "RmsNormFp32", "RmsNorm2dFp32", "SimpleNorm", "SimpleNorm2d"),
    "timm.layers.evo_norm": (
        "EvoNorm2dB0",
        "EvoNorm2dB1",
        "EvoNorm2dB2",
        "EvoNorm2dS0",
        "EvoNorm2dS0a",
        "EvoNorm2dS1",
        "EvoNorm2dS1a",
        "EvoNorm2dS2",
        "EvoNorm2dS2a",
    ),
}


def norm_types() -> tuple[type, ...]:
    """The module classes counted as normalization layers (optional packages only when already imported)."""
    found = list(_TORCH_NORMS)
    for module_name, names in _OPTIONAL_NORMS.items():
        loaded = sys.modules.get(module_name)
        if loaded is not None:
            found += [getattr(loaded, n) for n in names if isinstance(getattr(loaded, n, None), type)]
    return tuple(found)


def is_norm_layer(module: nn.Module) -> bool:
    """True when ``module`` is one of :func:`norm_types`."""
    return isinstance(module, norm_types())


@dataclass(frozen=True)
class ProbeResult:
    """What the probe found. Paths are each module's first dotted path (as ``named_modules`` gives it).

    ``unnormalized`` maps a conv path to what its output feeds instead of a norm layer (e.g. ``"silu"``,
    ``"Conv2d"``, ``"add"``, ``"model output"``). ``unreached`` lists convs the probe never saw run (an
    unused branch, or a branch this input or mode does not take): they are neither flagged nor cleared.
    ``method`` is ``"fx"``, ``"hooks"`` or ``"unavailable"``; ``detail`` says why a method failed.
    """

    method: str
    detail: str = ""
    unnormalized: dict[str, str] = field(default_factory=dict)
    normalized: tuple[str, ...] = ()
    unreached: tuple[str, ...] = ()

    @property
    def available(self) -> bool:
        return self.method != "unavailable"

    def describe(self) -> str:
        """One line for reports: the method used, or why detection is unavailable."""
        if not self.available:
            return f"unavailable: {self.detail}"
        text = {"fx": "torch.fx trace", "hooks": "forward hooks on the example input"}[self.method]
        return f"{text} ({self.detail})" if self.detail else text


class _Findings:
    """Per conv (by module id): the non-norm consumers of its output, whether a norm consumed it, if it ran."""

    def __init__(self, model: nn.Module) -> None:
        self.convs: dict[int, str] = {}
        for path, module in model.named_modules():
            if isinstance(module, _ConvNd):
                self.convs.setdefault(id(module), path)
        self.consumers: dict[int, list[str]] = {}
        self.normed: set[int] = set()
        self.ran: set[int] = set()

    def consume(self, conv_ids: set[int], consumer: str) -> None:
        for conv_id in conv_ids:
            names = self.consumers.setdefault(conv_id, [])
            if consumer not in names:
                names.append(consumer)

    def result(self, method: str, detail: str = "") -> ProbeResult:
        unnormalized: dict[str, str] = {}
        normalized: list[str] = []
        unreached: list[str] = []
        for conv_id, path in self.convs.items():
            if conv_id not in self.ran:
                unreached.append(path)
            elif conv_id in self.consumers:
                unnormalized[path] = ", ".join(self.consumers[conv_id])
            elif conv_id in self.normed:
                normalized.append(path)
            else:
                unnormalized[path] = "nothing (output unused)"
        return ProbeResult(method, detail, unnormalized, tuple(normalized), tuple(unreached))


def _error_text(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else ""
    if len(first) > 100:
        first = first[:97] + "..."
    return f"{type(error).__name__}: {first}".rstrip(": ")


# --- method 1: torch.fx ------------------------------------------------------------------------


class _LeafTracer(fx.Tracer):
    """fx's default tracer, with convs and norm layers kept as single nodes."""

    def __init__(self, norms: tuple[type, ...]) -> None:
        super().__init__()
        self._norms = norms

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (_ConvNd, *self._norms)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _snapshot(model: nn.Module) -> list[tuple[nn.Module, dict[str, Any]]]:
    return [(m, dict(m.__dict__)) for m in model.modules()]


def _restore(snapshot: list[tuple[nn.Module, dict[str, Any]]]) -> None:
    """Undo attribute assignments a traced forward made (it may have stored fx Proxies on modules)."""
    for module, saved in snapshot:
        current = module.__dict__
        if current.keys() != saved.keys() or any(current[k] is not v for k, v in saved.items()):
            current.clear()
            current.update(saved)


def _zero_constant_pad(module: nn.Module) -> bool:
    return isinstance(module, (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)) and module.value == 0


def _scale_preserving_call(name: str, args: tuple, kwargs: dict) -> bool:
    """False for the one listed op whose arguments can break homogeneity: padding with a nonzero constant."""
    if name != "pad":
        return True
    mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
    value = kwargs.get("value", args[3] if len(args) > 3 else None)
    return mode != "constant" or not value


def _fx_probe(model: nn.Module, findings: _Findings, norms: tuple[type, ...]) -> None:
    snapshot = _snapshot(model)
    try:
        graph = _LeafTracer(norms).trace(model)
    finally:
        _restore(snapshot)

    def classify(node: fx.Node) -> tuple[str, str]:
        if node.op == "output":
            return "consumer", "model output"
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            if isinstance(module, norms):
                return "norm", ""
            if isinstance(module, _SCALE_PRESERVING_MODULES) or _zero_constant_pad(module):
                return "pass", ""
            return "consumer", type(module).__name__ if not isinstance(module, _ConvNd) else _conv_name(module)
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        if name in NORM_FUNCTIONS:
            return "norm", ""
        if name in SCALE_PRESERVING_OPS and _scale_preserving_call(name, node.args, node.kwargs):
            return "pass", ""
        if name in _METADATA_OPS:
            return "ignore", ""
        return "consumer", name

    for node in graph.nodes:
        if node.op != "call_module":
            continue
        module = model.get_submodule(node.target)
        if not isinstance(module, _ConvNd):
            continue
        conv_id = id(module)
        findings.ran.add(conv_id)
        stack, seen = list(node.users), set()
        while stack:
            user = stack.pop()
            if user in seen:
                continue
            seen.add(user)
            kind, name = classify(user)
            if kind == "norm":
                findings.normed.add(conv_id)
            elif kind == "pass":
                stack.extend(user.users)
            elif kind == "consumer":
                findings.consume({conv_id}, name)


def _conv_name(module: nn.Module) -> str:
    from torch.nn.utils import parametrize

    return parametrize.type_before_parametrizations(module).__name__


# --- method 2: forward hooks + TorchFunctionMode on a sample input --------------------------------


class _Flow:
    """Which tensors carry (a scale-preserving function of) which convs' outputs."""

    def __init__(self, findings: _Findings) -> None:
        self.findings = findings
        self.tags: dict[int, tuple[torch.Tensor, frozenset[int]]] = {}  # id -> (tensor kept alive, conv ids)
        self.depth = 0  # > 0 while inside a conv or norm module: its internals are not followed

    def sources(self, tree: Any) -> set[int]:
        found: set[int] = set()
        for leaf in tree_flatten(tree)[0]:
            if isinstance(leaf, torch.Tensor):
                entry = self.tags.get(id(leaf))
                if entry is not None and entry[0] is leaf:
                    found |= entry[1]
        return found

    def untag(self, tree: Any) -> None:
        """Forget tags on ``tree``'s tensors (an in-place op that is not scale-preserving returned them)."""
        for leaf in tree_flatten(tree)[0]:
            if isinstance(leaf, torch.Tensor):
                entry = self.tags.get(id(leaf))
                if entry is not None and entry[0] is leaf:
                    del self.tags[id(leaf)]

    def tag(self, tree: Any, conv_ids: set[int] | frozenset[int], replace: bool = False) -> None:
        for leaf in tree_flatten(tree)[0]:
            if isinstance(leaf, torch.Tensor):
                entry = self.tags.get(id(leaf))
                old = entry[1] if entry is not None and entry[0] is leaf and not replace else frozenset()
                self.tags[id(leaf)] = (leaf, old | frozenset(conv_ids))


def _holds_tensor(tree: Any) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in tree_flatten(tree)[0])


class _FlowMode(TorchFunctionMode):
    def __init__(self, flow: _Flow) -> None:
        super().__init__()
        self.flow = flow

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        flow = self.flow
        if flow.depth:
            return result
        sources = flow.sources((args, kwargs))
        if not sources:
            return result
        name = getattr(func, "__name__", str(func))
        if name in NORM_FUNCTIONS:
            flow.findings.normed |= sources
        elif name in SCALE_PRESERVING_OPS and _scale_preserving_call(name, args, kwargs):
            flow.tag(result, sources)
        elif name not in _METADATA_OPS and _holds_tensor(result):
            flow.findings.consume(sources, name)
            flow.untag(result)
        return result


def _hook_probe(model: nn.Module, inputs: tuple, findings: _Findings, norms: tuple[type, ...]) -> None:
    flow = _Flow(findings)
    handles = []

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if flow.depth == 0:
            sources = flow.sources((args, kwargs))
            if sources:
                if isinstance(module, norms):
                    findings.normed |= sources
                else:
                    findings.consume(sources, _conv_name(module))
        flow.depth += 1

    def post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        flow.depth -= 1
        if flow.depth == 0 and isinstance(module, _ConvNd):
            findings.ran.add(id(module))
            flow.tag(output, {id(module)}, replace=True)

    for module in model.modules():
        if isinstance(module, (_ConvNd, *norms)):
            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True))
            handles.append(module.register_forward_hook(post_hook, with_kwargs=True, always_call=True))
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), _FlowMode(flow):
            output = model(*inputs)
        sources = flow.sources(output)
        if sources:
            findings.consume(sources, "model output")
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training


def _as_args(example_inputs: Any) -> tuple:
    """A tuple is the positional arguments; anything else (a Tensor, a list of images) is the only one."""
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


METHODS = ("auto", "fx", "hooks")


def probe_unnormalized(model: nn.Module, example_inputs: Any = None, *, method: str = "auto") -> ProbeResult:
    """Classify every conv of ``model`` as normalized, unnormalized or unreached (see the module docstring).

    ``method="auto"`` tries torch.fx first and, when tracing fails and ``example_inputs`` is given, runs the
    model once on it; ``"fx"`` or ``"hooks"`` use only that method. ``example_inputs`` is a tuple of
    positional arguments, or a single argument such as a Tensor or a list of images for a torchvision
    detection model. Never raises for a model it cannot analyse: the result's ``method`` is then
    ``"unavailable"`` and ``detail`` says why.
    """
    if method not in METHODS:
        raise InvalidOptionError(f"method={method!r} is not a probe method; use one of {list(METHODS)}")
    if method == "hooks" and example_inputs is None:
        raise InvalidOptionError("method='hooks' runs the model: pass example_inputs (e.g. a sample batch)")
    norms = norm_types()
    findings = _Findings(model)
    if not findings.convs:
        return ProbeResult(method if method != "auto" else "fx", "the model has no convolution")
    fx_failure = "torch.fx not tried (method='hooks')"
    if method != "hooks":
        try:
            _fx_probe(model, findings, norms)
            return findings.result("fx")
        except Exception as error:  # tracing runs arbitrary forward code; any failure means "cannot trace"
            fx_failure = f"torch.fx cannot trace the model ({_error_text(error)})"
    if method == "fx":
        return ProbeResult("unavailable", fx_failure)
    if example_inputs is None:
        return ProbeResult(
            "unavailable",
            f"{fx_failure}; pass example_inputs or input_shape (CLI: --input-shape) to probe with a forward pass",
        )
    findings = _Findings(model)
    try:
        _hook_probe(model, _as_args(example_inputs), findings, norms)
    except Exception as error:  # the user's forward on the user's input
        return ProbeResult(
            "unavailable", f"{fx_failure}; the forward pass on example_inputs failed ({_error_text(error)})"
        )
    return findings.result("hooks", fx_failure if method == "auto" else "")


# --- glue used by convert.py -------------------------------------------------------------------


def resolve_example_inputs(model: nn.Module, example_inputs: Any, input_shape: Any) -> Any:
    """``example_inputs``, or a random normal tensor of ``input_shape`` on the model's device and dtype.

    ``input_shape`` (e.g. ``(1, 3, 224, 224)``) is the JSON-friendly form the CLI's ``--input-shape`` uses.
    """
    if input_shape is None:
        return example_inputs
    if example_inputs is not None:
        raise InvalidOptionError("pass example_inputs or input_shape, not both")
    if (
        isinstance(input_shape, (str, bytes))
        or not isinstance(input_shape, (list, tuple))
        or not input_shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in input_shape)
    ):
        raise InvalidOptionError(
            f"input_shape={input_shape!r} must be a non-empty list of positive integers, e.g. [1, 3, 224, 224]"
        )
    reference = next((t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()), None)
    if reference is None:
        return torch.randn(tuple(input_shape))
    return torch.randn(tuple(input_shape), device=reference.device, dtype=reference.dtype)


def skip_unnormalized_steps(steps: list, probe: ProbeResult | None, options: Any) -> list:
    """With ``options.skip_unnormalized``, turn each unnormalized conv's planned standardization into a skip.

    ``steps`` are ``wsconvert.walk.Step``s; a step is matched to the probe by its module's first path.
    When detection is unavailable nothing is skipped and a warning says so (the report notes it too).
    """
    from ..rules.builtin import Decision
    from ..walk import Step

    if probe is None or not options.skip_unnormalized:
        return steps
    if not probe.available:
        warnings.warn(
            f"{SKIPPED_NOTHING}: unnormalized-conv detection is {probe.describe()}; {INPUT_FIX}",
            ProbeUnavailableWarning,
            stacklevel=3,
        )
        return steps
    marked = []
    for step in steps:
        feeds = probe.unnormalized.get(step.site.paths[0])
        if feeds is not None and step.decision.action == "standardize":
            reason = f"output feeds no normalization layer ({feeds}); skip_unnormalized=True"
            step = Step(step.site, step.rule, Decision("skip", reason=reason))
        marked.append(step)
    return marked


def add_probe_to_report(report: Any, steps: list, probe: ProbeResult, options: Any) -> Any:
    """Fill ``report.unnormalized`` / ``unnormalized_detection`` and add notes on what the probe could not see."""
    from ..report import UnnormalizedConv
    from ..rules.builtin import type_name

    sites = {step.site.paths[0]: step.site for step in steps}
    report.unnormalized_detection = probe.describe()
    for path, feeds in probe.unnormalized.items():
        site = sites.get(path)
        kind = type_name(site.module) if site is not None else "conv"
        also_at = tuple(site.paths[1:]) if site is not None else ()
        report.unnormalized.append(UnnormalizedConv(path, kind, feeds, also_at))
    if options.skip_unnormalized and not probe.available:
        report.notes.append(f"skip_unnormalized=True skipped nothing: detection {probe.describe()}")
    if probe.unreached:
        shown = ", ".join(probe.unreached[:3]) + (", ..." if len(probe.unreached) > 3 else "")
        report.notes.append(
            f"{len(probe.unreached)} conv(s) did not run during the unnormalized-conv probe ({shown}): "
            "they are not classified (a branch this input or mode does not take)"
        )
    return report
