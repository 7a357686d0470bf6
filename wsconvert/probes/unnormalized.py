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
   pre-hook. Needs an input, works with any Python control flow. Without one (``synthetic=True``, what
   ``plan_conversion`` / ``convert_model`` use), the input is built from the model itself
   (:func:`synthetic_input`: channels and spatial size from a Hugging Face ``config`` or timm
   ``pretrained_cfg``, else the first conv's ``in_channels`` and 224), and the result says it was synthetic.

When neither works the result is ``"unavailable"`` with the reasons; nothing is raised. Training flags and
buffer values (BatchNorm statistics) are restored after every forward pass and trace.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn
from torch.nn.modules.conv import _ConvNd
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import InvalidOptionError
from ..report import INPUT_FIX, SYNTHETIC_DETECTION
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
    "synthetic_input",
]

# What to do when a check needs a forward pass and has none (or the trace failed): said by warnings and hints.
SKIPPED_NOTHING = "skip_unnormalized=True skipped nothing"  # said by the report note and probe_unavailable hint

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
    ``synthetic`` describes the input the hook method ran on when the caller gave none (``synthetic_input``),
    "" otherwise.
    """

    method: str
    detail: str = ""
    unnormalized: dict[str, str] = field(default_factory=dict)
    normalized: tuple[str, ...] = ()
    unreached: tuple[str, ...] = ()
    synthetic: str = ""
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
        if self.method == "hooks" and self.synthetic:
            text = f"{SYNTHETIC_DETECTION} {self.synthetic}"
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

    def result(self, method: str, detail: str = "", synthetic: str = "") -> ProbeResult:
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
        return ProbeResult(
            method, detail, unnormalized, tuple(normalized), tuple(unreached), synthetic, dict(self.convs)
        )


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
    buffers = _BufferValues(model)  # tracing runs the forward's Python on real buffers (``self.count += 1``)
    try:
        graph = _LeafTracer(norms, findings.convs).trace(model)
    finally:
        _restore(snapshot)
        buffers.restore()

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
    tags with a ``TorchFunctionMode`` and records what consumes them. ``fx_failure`` says why fx was not used.
    ``inputs`` is what that forward pass runs on: the caller's example input, or one built by ``synthetic_input``
    (``synthetic`` then describes it)."""

    def __init__(
        self,
        model: nn.Module,
        norms: tuple[type, ...],
        fx_failure: str,
        method: str,
        rules: Sequence[Rule] | None,
        inputs: Any = None,
        synthetic: str = "",
    ) -> None:
        self.model, self.norms, self.fx_failure, self.method = model, norms, fx_failure, method
        self.inputs, self.synthetic = inputs, synthetic
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
        if failure and self.synthetic:
            detail = (
                f"{self.fx_failure}; the forward pass on a synthetic input {self.synthetic} failed ({failure}); pass "
                "example_inputs or input_shape (CLI: --input-shape) to probe with a forward pass"
            )
            return ProbeResult("unavailable", detail)
        if failure:
            detail = f"{self.fx_failure}; the forward pass on example_inputs failed ({failure})"
            return ProbeResult("unavailable", detail)
        return self.findings.result("hooks", self.fx_failure if self.method == "auto" else "", self.synthetic)


class _BufferValues:
    """Every buffer of a model and a copy of its value, to put back what a forward pass changed (a BatchNorm that
    updates its statistics, a module that caches a tensor as a buffer)."""

    def __init__(self, model: nn.Module) -> None:
        self.saved = [
            (module, name, tensor, tensor._version, None if tensor.is_meta else tensor.detach().clone())
            for module in model.modules()
            for name, tensor in module._buffers.items()
            if tensor is not None
        ]

    def restore(self) -> None:
        with torch.no_grad():
            for module, name, tensor, version, value in self.saved:
                if module._buffers.get(name) is not tensor:
                    module._buffers[name] = tensor
                if value is not None and tensor._version != version:
                    tensor.copy_(value)


def run_forward(model: nn.Module, example_inputs: Any, observers: list) -> str:
    """Run ``model`` once on ``example_inputs`` (eval mode, no grad) with all ``observers`` attached: context
    managers whose ``__enter__`` installs hooks and returns a callable given the model's output (or None). One
    pass serves every check that needs a forward (wsconvert.plan). Every training flag and every buffer's value
    (BatchNorm statistics) are restored. Attributes the forward sets are kept: transformers installs its
    output-capturing hooks on the first forward and records that in an attribute; removing the attribute would
    install them twice on the next forward, which changes what the model computes.
    The forward gets new containers around the same tensors: a model that writes into its input list
    (pytorchvideo SlowFast's pathway fusion) leaves the user's example input as it was.
    Returns '' or the error text when the forward pass (or an observer) failed; never raises for the user's
    forward."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = _BufferValues(model)
    try:
        with contextlib.ExitStack() as stack:
            on_output = [stack.enter_context(observer) for observer in observers]
            model.eval()
            with torch.no_grad():
                output = model(*_as_args(tree_map(_same, example_inputs)))  # fresh lists/dicts, same tensors
            for saw in on_output:
                if saw is not None:
                    saw(output)
    except Exception as error:  # the user's forward on the user's input
        return _error_text(error)
    finally:
        buffers.restore()
        for module, training in modes:
            module.training = training
    return ""


def _same(leaf: Any) -> Any:
    return leaf


def _as_args(example_inputs: Any) -> tuple:
    """A tuple is the positional arguments; anything else (a Tensor, a list of images) is the only one."""
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


METHODS = ("auto", "fx", "hooks")


def probe_unnormalized(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    method: str = "auto",
    rules: Sequence[Rule] | None = None,
    synthetic: bool = False,
) -> ProbeResult:
    """Classify every conv of ``model`` as normalized, unnormalized or unreached (see the module docstring).

    ``method="auto"`` tries torch.fx first and, when tracing fails and ``example_inputs`` is given, runs the
    model once on it; ``"fx"`` or ``"hooks"`` use only that method. With ``synthetic=True`` and no
    ``example_inputs``, the hook method (``"auto"`` after a failed trace, or ``"hooks"``) runs on an input built
    by :func:`synthetic_input`, and the result's ``synthetic`` says so. ``example_inputs`` is a tuple of
    positional arguments, or a single argument such as a Tensor or a list of images for a torchvision
    detection model. Never raises for a model it cannot analyse: the result's ``method`` is then
    ``"unavailable"`` and ``detail`` says why. ``rules`` are a call's own rules (``wsconvert.rules.resolve``):
    a module the first matching rule gives kind "norm" counts as a norm layer.
    """
    result, pending = start_probe(model, example_inputs, method=method, rules=rules, synthetic=synthetic)
    if pending is None:
        return result
    return pending.result(run_forward(model, pending.inputs, [pending]))


def start_probe(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    method: str = "auto",
    rules: Sequence[Rule] | None = None,
    synthetic: bool = False,
) -> tuple[ProbeResult | None, HookProbe | None]:
    """``probe_unnormalized`` up to its forward pass: ``(result, None)`` when done (the fx trace, at most one,
    worked, or nothing can be done), else ``(None, observer)``: a ``HookProbe`` to attach to ``run_forward``
    (with any other observer of that pass), whose ``result(...)`` is the finding and whose ``inputs`` are what
    that pass runs on (``example_inputs``, or with ``synthetic=True`` and none given, a ``synthetic_input``)."""
    if method not in METHODS:
        raise InvalidOptionError(f"method={method!r} is not a probe method; use one of {list(METHODS)}")
    if method == "hooks" and example_inputs is None and not synthetic:
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
    if example_inputs is not None:
        return None, HookProbe(model, norms, fx_failure, method, rules, example_inputs)
    fix = "pass example_inputs or input_shape (CLI: --input-shape) to probe with a forward pass"
    if not synthetic:
        return ProbeResult("unavailable", f"{fx_failure}; {fix}"), None
    inputs, how = synthetic_input(model)
    if inputs is None:
        return ProbeResult("unavailable", f"{fx_failure}; no synthetic input could be built ({how}); {fix}"), None
    return None, HookProbe(model, norms, fx_failure, method, rules, inputs, how)


# --- a synthetic input, when the caller gave none ------------------------------------------------

SYNTHETIC_SIZE = 224  # per spatial dimension of a 1-d or 2-d conv model (the common ImageNet input size)
SYNTHETIC_SIZE_3D = (16, 112, 112)  # frames, height, width: the common video clip (e.g. torchvision r3d_18)


def _positive_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def _config_size(value: object, dims: int) -> tuple[int, ...] | None:
    """A spatial size from a config entry: an int (square), a sequence of ``dims`` ints, or {"height", "width"}."""
    if isinstance(value, dict):
        value = (value.get("height"), value.get("width"))
    if _positive_int(value):
        return (value,) * dims
    if isinstance(value, (list, tuple)) and len(value) == dims and all(_positive_int(v) for v in value):
        return tuple(value)
    return None


def synthetic_input(model: nn.Module) -> tuple[torch.Tensor | None, str]:
    """An input built from ``model`` itself for the hook probe, and how it was built; ``(None, why)`` when none can.

    Shape ``(1, channels, *size)``: channels from the model's Hugging Face ``config.num_channels`` or timm
    ``pretrained_cfg["input_size"]``, else from the first convolution's ``in_channels`` (in definition order);
    the spatial size from ``config.image_size`` or timm's ``input_size``, else 224 per dimension for a 1-d/2-d
    conv (16x112x112 for a 3-d conv). Normal random values from a fixed seed (the global RNG is not used), on
    the model's device and floating dtype (``torch.empty`` on the meta device).
    """
    first = next((m for m in model.modules() if isinstance(m, _ConvNd) and _positive_int(m.in_channels)), None)
    if first is None:
        return None, "the model has no torch convolution to take the input channels from"
    dims = len(first.kernel_size)
    config = getattr(model, "config", None)
    timm_cfg = getattr(model, "pretrained_cfg", None)
    timm_size = timm_cfg.get("input_size") if isinstance(timm_cfg, dict) else None
    timm_size = timm_size if isinstance(timm_size, (list, tuple)) and len(timm_size) == dims + 1 else None
    channels, size, sources = None, None, []
    if _positive_int(getattr(config, "num_channels", None)):
        channels = config.num_channels
        sources.append("channels from config.num_channels")
    elif timm_size is not None and _positive_int(timm_size[0]):
        channels = timm_size[0]
        sources.append("channels from pretrained_cfg['input_size']")
    else:
        channels = first.in_channels
        path = next(p for p, m in model.named_modules() if m is first)
        sources.append(f"channels from the first conv ({path or '<model>'}.in_channels)")
    size = _config_size(getattr(config, "image_size", None), dims)
    if size is not None:
        sources.append("size from config.image_size")
    elif timm_size is not None and _config_size(tuple(timm_size[1:]), dims) is not None:
        size = tuple(timm_size[1:])
        sources.append("size from pretrained_cfg['input_size']")
    else:
        size = SYNTHETIC_SIZE_3D if dims == 3 else (SYNTHETIC_SIZE,) * dims
        sources.append("default size")
    shape = (1, channels, *size)
    reference = next((t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None else torch.get_default_dtype()
    if device.type == "meta":
        tensor = torch.empty(shape, device=device, dtype=dtype)
    else:
        generator = torch.Generator().manual_seed(0)
        tensor = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    return tensor, f"of shape {tuple(shape)} ({', '.join(sources)})"


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
    identity (``ProbeResult.feeds_of``). When detection is unavailable nothing is skipped: the report notes it,
    and ``wsconvert.report.warn_loud_hints`` warns.
    """
    from ..rules.builtin import Decision
    from ..walk import Step

    if probe is None or not options.skip_unnormalized or not probe.available:
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
