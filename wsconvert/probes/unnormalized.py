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
timm's FrozenBatchNormAct2d, RmsNorm*, SimpleNorm* and EvoNorm layers; types given to
``wsconvert.rules.declare_norm``; modules a rule of kind "norm" matches (``wsconvert.rules.is_norm``). The
functional forms (``F.batch_norm``, ``F.group_norm``, ``F.layer_norm``, ``F.instance_norm``, ``F.rms_norm``) count too.
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

import contextlib
import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..errors import InvalidOptionError, ProbeUnavailableWarning
from ..report import INPUT_FIX
from ..rules import kinds
from ..rules.kinds import OPTIONAL_NORMS as _OPTIONAL_NORMS  # noqa: F401  # moved to wsconvert.rules.kinds
from ..rules.kinds import is_conv

if TYPE_CHECKING:
    from ..rules.base import Rule

__all__ = [
    "INPUT_FIX",
    "METHODS",
    "NORM_FUNCTIONS",
    "SCALE_PRESERVING_OPS",
    "HookProbe",
    "ProbeResult",
    "is_norm_layer",
    "norm_types",
    "probe_unnormalized",
    "resolve_example_inputs",
    "run_forward",
    "start_probe",
]

# What to do when a check needs a forward pass and has none (or the trace failed): said by warnings and hints.
SKIPPED_NOTHING = "skip_unnormalized=True skipped nothing"  # starts that warning; the CLI says it once

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


def norm_types() -> tuple[type, ...]:
    """The module classes counted as normalization layers (optional packages only when already imported, declared
    types too); see ``wsconvert.rules.kinds`` (``is_norm`` also counts modules matched by a rule of kind "norm")."""
    return kinds.norm_types()


def is_norm_layer(module: nn.Module, rules: Sequence[Rule] | None = None) -> bool:
    """True when ``module`` is a normalization layer (``wsconvert.rules.is_norm``; ``rules`` are a call's own)."""
    return kinds.is_norm(module, rules)


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
    # id(conv module) -> its path above, so findings join to planned steps by module identity (feeds_of).
    conv_paths: dict[int, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def available(self) -> bool:
        return self.method != "unavailable"

    def feeds_of(self, module: nn.Module, path: str) -> str | None:
        """What ``module``'s output feeds instead of a norm layer, or None; found by identity (``path`` is
        used only for a result built without ``conv_paths``)."""
        if self.conv_paths:
            path = self.conv_paths.get(id(module))
        return None if path is None else self.unnormalized.get(path)

    def describe(self) -> str:
        """One line for reports: the method used, or why detection is unavailable."""
        if not self.available:
            return f"unavailable: {self.detail}"
        text = {"fx": "torch.fx trace", "hooks": "forward hooks on the example input"}[self.method]
        return f"{text} ({self.detail})" if self.detail else text


class _Findings:
    """Per conv (by module id): the non-norm consumers of its output, whether a norm consumed it, if it ran."""

    def __init__(self, model: nn.Module, rules: Sequence[Rule] | None = None) -> None:
        self.convs: dict[int, str] = {}  # every conv of the model, a call's own conv rules included
        for path, module in model.named_modules():
            if is_conv(module, rules):
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
        return ProbeResult(method, detail, unnormalized, tuple(normalized), tuple(unreached), dict(self.convs))


def _error_text(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else ""
    if len(first) > 100:
        first = first[:97] + "..."
    return f"{type(error).__name__}: {first}".rstrip(": ")


# --- method 1: torch.fx ------------------------------------------------------------------------


class _LeafTracer(fx.Tracer):
    """fx's default tracer, with convs and norm layers kept as single nodes."""

    def __init__(self, norms: tuple[type, ...], convs: Collection[int]) -> None:
        super().__init__()
        self._norms, self._convs = norms, convs

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self._convs or isinstance(m, self._norms):
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
        graph = _LeafTracer(norms, findings.convs).trace(model)
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
            return "consumer", type(module).__name__ if id(module) not in findings.convs else _conv_name(module)
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
        if id(module) not in findings.convs:
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


class HookProbe:
    """The hook method as an observer of one forward pass (``run_forward``): tags each conv's output, follows the
    tags with a ``TorchFunctionMode`` and records what consumes them. ``fx_failure`` says why fx was not used."""

    def __init__(
        self, model: nn.Module, norms: tuple[type, ...], fx_failure: str, method: str, rules: Sequence[Rule] | None
    ) -> None:
        self.model, self.norms, self.fx_failure, self.method = model, norms, fx_failure, method
        self.findings = _Findings(model, rules)  # fresh: a failed fx attempt may have filled the first one
        self.flow = _Flow(self.findings)
        self.handles: list = []
        self.mode = _FlowMode(self.flow)

    def __enter__(self) -> Any:
        flow, findings, norms = self.flow, self.findings, self.norms

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
            if flow.depth == 0 and id(module) in findings.convs:
                findings.ran.add(id(module))
                flow.tag(output, {id(module)}, replace=True)

        try:
            for module in self.model.modules():
                if id(module) in findings.convs or isinstance(module, norms):
                    self.handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True))
                    self.handles.append(module.register_forward_hook(post_hook, with_kwargs=True, always_call=True))
            self.mode.__enter__()
        except BaseException:
            self._remove()
            raise
        return self.saw_output

    def saw_output(self, output: Any) -> None:
        sources = self.flow.sources(output)
        if sources:
            self.findings.consume(sources, "model output")

    def __exit__(self, *exc: object) -> None:
        try:
            self.mode.__exit__(*exc)
        finally:
            self._remove()

    def _remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def result(self, failure: str) -> ProbeResult:
        """The finding after the forward pass; ``failure`` is ``run_forward``'s error text ('' when it ran)."""
        if failure:
            detail = f"{self.fx_failure}; the forward pass on example_inputs failed ({failure})"
            return ProbeResult("unavailable", detail)
        return self.findings.result("hooks", self.fx_failure if self.method == "auto" else "")


def run_forward(model: nn.Module, example_inputs: Any, observers: list) -> str:
    """Run ``model`` once on ``example_inputs`` (eval mode, no grad, every training flag restored) with all
    ``observers`` attached: context managers whose ``__enter__`` installs hooks and returns a callable given the
    model's output (or None). One pass serves every check that needs a forward (wsconvert.plan). Returns '' or
    the error text when the forward pass (or an observer) failed; never raises for the user's forward."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        with contextlib.ExitStack() as stack:
            on_output = [stack.enter_context(observer) for observer in observers]
            model.eval()
            with torch.no_grad():
                output = model(*_as_args(example_inputs))
            for saw in on_output:
                if saw is not None:
                    saw(output)
    except Exception as error:  # the user's forward on the user's input
        return _error_text(error)
    finally:
        for module, training in modes:
            module.training = training
    return ""


def _as_args(example_inputs: Any) -> tuple:
    """A tuple is the positional arguments; anything else (a Tensor, a list of images) is the only one."""
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


METHODS = ("auto", "fx", "hooks")


def probe_unnormalized(
    model: nn.Module, example_inputs: Any = None, *, method: str = "auto", rules: Sequence[Rule] | None = None
) -> ProbeResult:
    """Classify every conv of ``model`` as normalized, unnormalized or unreached (see the module docstring).

    ``method="auto"`` tries torch.fx first and, when tracing fails and ``example_inputs`` is given, runs the
    model once on it; ``"fx"`` or ``"hooks"`` use only that method. ``example_inputs`` is a tuple of
    positional arguments, or a single argument such as a Tensor or a list of images for a torchvision
    detection model. Never raises for a model it cannot analyse: the result's ``method`` is then
    ``"unavailable"`` and ``detail`` says why. ``rules`` are a call's own rules (``wsconvert.rules.resolve``):
    a module the first matching rule gives kind "norm" counts as a norm layer.
    """
    result, pending = start_probe(model, example_inputs, method=method, rules=rules)
    if pending is None:
        return result
    return pending.result(run_forward(model, example_inputs, [pending]))


def start_probe(
    model: nn.Module, example_inputs: Any = None, *, method: str = "auto", rules: Sequence[Rule] | None = None
) -> tuple[ProbeResult | None, HookProbe | None]:
    """``probe_unnormalized`` up to its forward pass: ``(result, None)`` when done (the fx trace, at most one,
    worked, or nothing can be done), else ``(None, observer)``: a ``HookProbe`` to attach to ``run_forward``
    (with any other observer of that pass), whose ``result(...)`` is the finding."""
    if method not in METHODS:
        raise InvalidOptionError(f"method={method!r} is not a probe method; use one of {list(METHODS)}")
    if method == "hooks" and example_inputs is None:
        raise InvalidOptionError("method='hooks' runs the model: pass example_inputs (e.g. a sample batch)")
    norms = kinds.norm_types_in(model, rules)
    findings = _Findings(model, rules)
    if not findings.convs:
        return ProbeResult(method if method != "auto" else "fx", "the model has no convolution"), None
    fx_failure = "torch.fx not tried (method='hooks')"
    if method != "hooks":
        try:
            _fx_probe(model, findings, norms)
            return findings.result("fx"), None
        except Exception as error:  # tracing runs arbitrary forward code; any failure means "cannot trace"
            fx_failure = f"torch.fx cannot trace the model ({_error_text(error)})"
    if method == "fx":
        return ProbeResult("unavailable", fx_failure), None
    if example_inputs is None:
        return ProbeResult(
            "unavailable",
            f"{fx_failure}; pass example_inputs or input_shape (CLI: --input-shape) to probe with a forward pass",
        ), None
    return None, HookProbe(model, norms, fx_failure, method, rules)


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

    ``steps`` are ``wsconvert.walk.Step``s of the probed model; a step is matched to the probe by module
    identity (``ProbeResult.feeds_of``). When detection is unavailable nothing is skipped and a warning says so
    (the report notes it too).
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
        feeds = probe.feeds_of(step.site.module, step.site.paths[0])
        if feeds is not None and step.decision.action == "standardize":
            reason = f"output feeds no normalization layer ({feeds}); skip_unnormalized=True"
            step = Step(step.site, step.rule, Decision("skip", reason=reason))
        marked.append(step)
    return marked


def probe_report_fields(steps: list, probe: ProbeResult, options: Any) -> tuple[list, str, list[str]]:
    """What the report says about the probe: ``(unnormalized entries, detection text, notes)``, for a report built
    once (wsconvert.plan); each conv is joined to its step by module identity."""
    from ..report import UnnormalizedConv
    from ..rules.builtin import type_name

    sites = {id(step.site.module): step.site for step in steps}
    by_path = {path: conv_id for conv_id, path in probe.conv_paths.items()}
    by_first_path = {step.site.paths[0]: step.site for step in steps}  # a ProbeResult built without conv_paths
    entries = []
    for path, feeds in probe.unnormalized.items():
        site = sites.get(by_path[path]) if path in by_path else by_first_path.get(path)
        kind = type_name(site.module) if site is not None else "conv"
        also_at = tuple(site.paths[1:]) if site is not None else ()
        entries.append(UnnormalizedConv(path, kind, feeds, also_at))
    notes = []
    if options.skip_unnormalized and not probe.available:
        notes.append(f"skip_unnormalized=True skipped nothing: detection {probe.describe()}")
    if probe.unreached:
        shown = ", ".join(probe.unreached[:3]) + (", ..." if len(probe.unreached) > 3 else "")
        notes.append(
            f"{len(probe.unreached)} conv(s) did not run during the unnormalized-conv probe ({shown}): "
            "they are not classified (a branch this input or mode does not take)"
        )
    return entries, probe.describe(), notes
