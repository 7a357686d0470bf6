"""ultralytics YOLO models with Weight Standardization (+ GroupNorm) that predict, val, export, save, load and train.

Issue 13, point 5. ultralytics (github.com/ultralytics/ultralytics) works against a converted model in three places:

- ``BaseModel.fuse()`` (run by predict, val and export; ultralytics/nn/tasks.py) folds every ``Conv.bn`` into its
  conv through ``bn.running_var``: a GroupNorm there has none, and with ``gn=None`` it assigns ``conv.weight`` of
  a parametrized conv. :func:`fuse` is the converted model's ``fuse``: it bakes WS into each conv (exact: W_hat
  is a constant in eval), lets ultralytics fold the BatchNorms that are left, and keeps each GroupNorm after
  its conv (``Conv.conv = Sequential(conv, GroupNorm)``, ``Conv.forward = Conv.forward_fuse``): a GroupNorm
  normalizes with each sample's own statistics, so unlike a BatchNorm it cannot be folded into the weights.
  The result holds only torch and ultralytics classes (ultralytics' own fused form: ``is_fused()`` is True).
- The trainer rebuilds the model from its yaml (``DetectionTrainer.get_model``) and copies the weights by
  name and shape, so ``YOLO(...).model = convert_model(...)`` followed by ``train()`` trained a plain model.
  :func:`convert_yolo` registers an ``on_pretrain_routine_start`` callback on the YOLO object that wraps the
  trainer's ``get_model``: the model it builds is converted with the same options before the weights are
  copied in (a converted source: after converting; an unconverted one, e.g. pretrained weights: before).
- Checkpoints pickle whole modules (``ema``, ``model``), and torch refuses to pickle parametrized modules
  (torch/nn/utils/parametrize.py). Converted convs here pickle as their plain conv plus the WS settings and
  are parametrized again when unpickled, so ``last.pt`` / ``best.pt`` load with ``YOLO(path)`` as the
  converted, trainable model (loading needs wsconvert installed; a fused model does not).

ultralytics is imported inside functions only; this module needs it only when called.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._optional import loaded_type
from ..convert import bake
from ..errors import InvalidOptionError, UnsupportedModuleError
from ..options import ConversionOptions
from ..plan import make_plan
from ..report import ConversionReport
from ..rules.base import Rule
from ..ws import cached_weight, compat
from ..ws.detect import has_standardization, only_standardization
from ..ws.standardize import WeightStandardization

__all__ = [
    "INFO_ATTRIBUTE",
    "attach",
    "convert_yolo",
    "conversion_record",
    "fuse",
    "is_converted",
    "make_picklable",
    "prepare",
    "trainable_as_ultralytics_trains",
]

# The attribute of a converted model holding its record (the options; a JSON dict). The same name marks a whole
# pickled module converted by the wsconvert command (wsconvert.checkpoint.layouts.WholeModuleLayout).
INFO_ATTRIBUTE = "_wsconvert_info"
# ultralytics/engine/trainer.py _setup_train: ``always_freeze_names = [".dfl"]``, every other floating-point
# parameter is made trainable.
ALWAYS_FROZEN = (".dfl",)
_OWN = "wsconvert."  # hooks of this package, removed by fuse so the fused model needs no wsconvert
_PROBE_SIZE = 64  # the example input's height and width: a multiple of YOLO's largest stride (32)


def _version() -> str:
    from .. import __version__

    return __version__


def _is_yolo(obj: object) -> bool:
    """An ultralytics ``YOLO`` object (``ultralytics.engine.model.Model``, itself an nn.Module around ``.model``)."""
    engine = loaded_type("ultralytics.engine.model", "Model")
    return engine is not None and isinstance(obj, engine)


def _model_of(yolo: Any) -> nn.Module:
    """The ultralytics model of a ``YOLO`` object (its ``.model``) or the model itself."""
    model = getattr(yolo, "model", None) if _is_yolo(yolo) or not isinstance(yolo, nn.Module) else yolo
    if not isinstance(model, nn.Module):
        raise InvalidOptionError(
            f"{type(yolo).__name__} is neither an ultralytics YOLO object with a PyTorch model nor an nn.Module; "
            "pass YOLO('yolo11n.yaml') / YOLO('best.pt') or its .model (exported formats cannot be converted)"
        )
    return model


def conversion_record(model: nn.Module) -> dict | None:
    """The record a converted model carries (``{"version", "options"}``), or None."""
    record = vars(model).get(INFO_ATTRIBUTE)
    return dict(record) if isinstance(record, Mapping) else None


def is_converted(model: nn.Module) -> bool:
    """True when ``model`` was converted by wsconvert (it carries the record or a standardized conv)."""
    return conversion_record(model) is not None or any(has_standardization(m) for m in model.modules())


@contextlib.contextmanager
def trainable_as_ultralytics_trains(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, ``requires_grad`` is what ultralytics' trainer sets: False for parameters under ``.dfl``
    (the fixed DFL conv), True for every other floating-point parameter; restored afterwards.

    ultralytics saves every module of a checkpoint frozen (ModelEMA and strip_optimizer set requires_grad=False),
    so without this the frozen-weight rule (``standardize_frozen``) would leave every conv of a loaded ``.pt``.
    """
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for name, p in model.named_parameters():
            if p.dtype.is_floating_point:
                p.requires_grad_(not any(frozen in name for frozen in ALWAYS_FROZEN))
        yield model
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _example_input(model: nn.Module) -> torch.Tensor:
    yaml = getattr(model, "yaml", None)
    channels = yaml.get("channels", 3) if isinstance(yaml, Mapping) else 3
    reference = next(model.parameters(), None)
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    device = reference.device if reference is not None else None
    return torch.zeros(1, int(channels), _PROBE_SIZE, _PROBE_SIZE, dtype=dtype, device=device)


def _convert_in_place(
    model: nn.Module,
    options: Mapping[str, Any],
    rules: Sequence[Rule] | None = None,
    example_inputs: object = None,
) -> ConversionReport:
    """Convert ``model`` in place with ``options`` (trainability as in training), then :func:`prepare` it."""
    if example_inputs is None:
        example_inputs = _example_input(model)
    with trainable_as_ultralytics_trains(model):
        plan = make_plan(model, example_inputs=example_inputs, rules=rules, **options)
        plan.apply(model, inplace=True)
    prepare(model, {"version": _version(), "options": dict(options)})  # as given: what convert_model takes again
    return plan.report


def convert_yolo(
    yolo: Any,
    *,
    rules: Sequence[Rule] | None = None,
    example_inputs: object = None,
    **options: Any,
) -> ConversionReport:
    """Convert an ultralytics ``YOLO`` object's model in place, so that it predicts, validates, exports, saves and
    trains as the converted model; returns the conversion report.

    ``options`` are ``convert_model``'s (``gn=32``, ``skip_unnormalized=True``, ...). The conversion plans with
    ultralytics' training-time trainability (:func:`trainable_as_ultralytics_trains`: only the DFL conv is frozen,
    so it is left by the frozen-weight rule; a loaded ``.pt`` is saved all frozen) and a zero input of 64x64 for
    the probes (``example_inputs`` to give another). Given a ``YOLO`` object, it also registers the trainer hook
    (:func:`attach`); given a bare ultralytics model, only the model is converted. An already converted model is
    refused: call ``attach(yolo)`` for one loaded from a converted file.
    """
    model = _model_of(yolo)
    if is_converted(model):
        raise InvalidOptionError(
            f"this {type(model).__name__} is already converted (record: {conversion_record(model)}); a model loaded "
            "from a converted file needs only wsconvert.integrations.ultralytics.attach(yolo) to train"
        )
    ConversionOptions.build(**options)  # a bad option is refused before anything changes
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}  # JSON values, as recorded
    report = _convert_in_place(model, options, rules, example_inputs)
    if _is_yolo(yolo):
        attach(yolo, rules=rules)
    return report


# --- fuse: bake WS, fold BatchNorms, keep GroupNorms ---------------------------------------------------------------


class _Fuse:
    """The converted model's ``fuse`` (an instance attribute, so it travels with the pickled model)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, verbose: bool = True, imgsz: int | list[int] = 640, **kwargs: Any) -> nn.Module:
        return fuse(self.model, verbose=verbose, imgsz=imgsz, **kwargs)

    def __repr__(self) -> str:
        return "<wsconvert fuse: bake WS, fold BatchNorms, keep GroupNorms>"


def _is_unfoldable_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.GroupNorm) or type(module).__name__ == "BatchChannelNorm"


def _foldable(norm: nn.Module) -> bool:
    """Whether ultralytics can fold ``norm`` into the conv before it (a BatchNorm with running statistics)."""
    return isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.running_var is not None


def fuse(model: nn.Module, verbose: bool = True, imgsz: int | list[int] = 640, **kwargs: Any) -> nn.Module:
    """Fuse a converted ultralytics model for inference, in place; what ``model.fuse()`` runs once converted.

    Every WS parametrization is baked (``wsconvert.bake``: W_hat as a plain weight, bitwise the eval output), then
    each ultralytics ``Conv`` / ``ConvTranspose`` whose ``bn`` is not a BatchNorm (a GroupNorm, a baked
    BatchChannelNorm) becomes ``conv = Sequential(conv, norm)`` with ``forward_fuse``, wsconvert's load hooks are
    removed (the fused model unpickles without wsconvert) and ultralytics' own ``fuse`` folds the remaining
    BatchNorms and fuses the heads. RepConv / RepVGGDW branches holding another norm
    cannot be reparameterized: UnsupportedModuleError names them.
    """
    from ultralytics.nn.modules import Conv, Conv2, ConvTranspose, RepConv, RepVGGDW

    for path, m in model.named_modules():
        if isinstance(m, (RepConv, RepVGGDW)) and any(_is_unfoldable_norm(n) for n in m.modules()):
            raise UnsupportedModuleError(
                f"{path} ({type(m).__name__}) holds a norm layer that is not a BatchNorm: its branches cannot be "
                f"reparameterized into one conv by fuse(); convert with exclude=['{path}', '{path}.*'] to keep it"
            )
    bake(model, inplace=True)
    for m in model.modules():
        if isinstance(m, Conv) and isinstance(getattr(m, "bn", None), nn.Module) and not _foldable(m.bn):
            if isinstance(m, Conv2):
                m.fuse_convs()  # merges the 1x1 branch into the 3x3 kernel (linear, before the norm)
            m.conv = nn.Sequential(m.conv, m.bn)
            del m.bn
            m.forward = m.forward_fuse
        elif isinstance(m, ConvTranspose) and not isinstance(getattr(m, "bn", nn.Identity()), nn.Identity):
            if not _foldable(m.bn):
                m.conv_transpose = nn.Sequential(m.conv_transpose, m.bn)
                del m.bn
                m.forward = m.forward_fuse
    for m in model.modules():  # the load hooks for original checkpoints (wsconvert.ws.compat): plain classes only
        hooks = m._load_state_dict_pre_hooks
        for key in [k for k, h in hooks.items() if getattr(getattr(h, "hook", h), "__module__", "").startswith(_OWN)]:
            del hooks[key]
    vars(model).pop("fuse", None)  # ultralytics' own fuse from now on
    return type(model).fuse(model, verbose=verbose, imgsz=imgsz, **kwargs)


# --- pickling converted convs ---------------------------------------------------------------------------------------


def _new_plain(cls: type) -> nn.Module:
    """Unpickling, step 1: an empty instance of a one-off subclass of the conv's plain class whose ``__setstate__``
    (pickle's BUILD) restores the state and registers WS again (step 2, :func:`_restore_standardized`)."""
    restoring = type(cls.__name__, (cls,), {"__setstate__": _restore_standardized, "__module__": cls.__module__})
    return restoring.__new__(restoring)


def _restore_standardized(module: nn.Module, state: tuple[dict, dict]) -> None:
    """Unpickling, step 2: the plain conv's state, then WS registered again on its (same) weight Parameter."""
    plain, settings = state
    module.__class__ = module.__class__.__bases__[0]
    module.__setstate__(plain)
    ws = WeightStandardization(
        settings["eps"],
        settings["style"],
        transposed=settings["transposed"],
        groups=settings["groups"],
        cache=settings["cache"],
    )
    if settings["gain"] is not None:
        ws.set_affine(settings["gain"], settings["shift"])
    parametrize.register_parametrization(module, "weight", ws, unsafe=True)
    cached_weight.install(module)
    compat.accept_plain_weight(module)
    make_picklable(module)


def _reduce_standardized(module: nn.Module, protocol: int) -> tuple:
    """``__reduce_ex__`` of a standardized conv: its plain class, then its state and the WS settings. The state is
    pickled after the object is memoized, so its hooks' references to the module resolve to the rebuilt one."""
    if not only_standardization(module) or len(module.parametrizations["weight"]) != 1:
        raise UnsupportedModuleError(
            f"{type(module).__name__}: only a conv whose weight carries one WeightStandardization can be pickled by "
            "wsconvert; bake() the model, or save its state_dict()"
        )
    chain = module.parametrizations["weight"]
    ws = chain[0]
    base = parametrize.type_before_parametrizations(module)
    plain = dict(module.__dict__)
    plain["_parameters"] = {"weight": chain.original, **module._parameters}
    plain["_modules"] = {k: v for k, v in module._modules.items() if k != "parametrizations"}
    settings = {
        "eps": ws.eps,
        "style": ws.style,
        "transposed": ws.transposed,
        "groups": ws.groups,
        "cache": ws.cache,
        "gain": ws._buffers.get("gain"),
        "shift": ws._buffers.get("shift"),
    }
    # (callable, args, state): plain REDUCE and BUILD opcodes, which torch's weights_only scanner
    # (get_unsafe_globals_in_checkpoint) reads, so such a file is refused or trusted like any other pickle.
    return _new_plain, (base,), (plain, settings)


def make_picklable(module: nn.Module) -> None:
    """Let a standardized conv pickle (torch.save of a whole model, deepcopy is unaffected).

    torch refuses to pickle a parametrized module; its ``Parametrized<Conv>`` class is private to the module
    (torch/nn/utils/parametrize.py), so giving that class a ``__reduce_ex__`` changes no other module.
    """
    cls = type(module)
    if parametrize.is_parametrized(module, "weight") and cls.__dict__.get("__reduce_ex__") is not _reduce_standardized:
        cls.__reduce_ex__ = _reduce_standardized


def prepare(model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
    """Make a converted ultralytics model usable by ultralytics: its record, picklable standardized convs and the
    WS-aware :func:`fuse` as its ``fuse``. Returns ``model``."""
    setattr(model, INFO_ATTRIBUTE, dict(record))
    for m in model.modules():
        if only_standardization(m):
            make_picklable(m)
    if callable(getattr(type(model), "fuse", None)):
        model.fuse = _Fuse(model)
    return model


# --- training --------------------------------------------------------------------------------------------------------


class _ConvertingGetModel:
    """The trainer's ``get_model``, converting the model it builds (ultralytics rebuilds the model from its yaml)."""

    def __init__(self, get_model: Any, options: Mapping[str, Any], rules: Sequence[Rule] | None) -> None:
        self.get_model = get_model
        self.options = dict(options)
        self.rules = rules

    def __call__(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> nn.Module:
        source = (weights.get("ema") or weights.get("model")) if isinstance(weights, Mapping) else weights
        if isinstance(source, nn.Module) and is_converted(source):
            record = conversion_record(source)
            if record is not None and record.get("options") != self.options:
                raise InvalidOptionError(
                    f"the weights to train from were converted with {record.get('options')}, the trainer converts "
                    f"with {self.options}; convert with the same options"
                )
            model = self.get_model(cfg=cfg, weights=None, verbose=verbose)
            _convert_in_place(model, self.options, self.rules)
            model.load(weights)  # ultralytics' transfer (by name and shape): the same converted keys
            # load() rebuilds the class convs of the head for another number of classes (new plain Conv2d):
            # convert what it added; converted modules are skipped as already converted.
            _convert_in_place(model, self.options, self.rules)
        else:
            model = self.get_model(cfg=cfg, weights=weights, verbose=verbose)
            _convert_in_place(model, self.options, self.rules)
        return model


class _TrainerHook:
    """``on_pretrain_routine_start``: wrap the trainer's ``get_model`` with the conversion."""

    def __init__(self, options: Mapping[str, Any], rules: Sequence[Rule] | None) -> None:
        self.options = dict(options)
        self.rules = rules

    def __call__(self, trainer: Any) -> None:
        if not isinstance(trainer.get_model, _ConvertingGetModel):
            trainer.get_model = _ConvertingGetModel(trainer.get_model, self.options, self.rules)


def attach(yolo: Any, *, rules: Sequence[Rule] | None = None) -> None:
    """Register the trainer hook on a ``YOLO`` object whose model is converted (by :func:`convert_yolo`, or loaded
    from a converted file): ``yolo.train(...)`` then trains a converted model, converted with the model's
    recorded options. Idempotent."""
    if not _is_yolo(yolo):
        raise InvalidOptionError(
            f"attach() takes an ultralytics YOLO object (its callbacks drive training), not a {type(yolo).__name__}"
        )
    model = _model_of(yolo)
    record = conversion_record(model)
    if record is None:
        raise InvalidOptionError(
            f"this {type(model).__name__} was not converted by wsconvert (no {INFO_ATTRIBUTE} record); "
            "call wsconvert.integrations.ultralytics.convert_yolo(yolo, gn=...) first"
        )
    hooks = yolo.callbacks.setdefault("on_pretrain_routine_start", [])
    hooks[:] = [h for h in hooks if not isinstance(h, _TrainerHook)]
    hooks.append(_TrainerHook(record.get("options") or {}, rules))
