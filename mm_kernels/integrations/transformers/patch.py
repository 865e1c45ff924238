"""Fusing the modules of one model instance, and of every model a model type builds."""

from __future__ import annotations

import functools
import importlib
import warnings
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from mm_kernels.integrations.transformers.kinds import KINDS, Kind
from mm_kernels.integrations.transformers.probe import module_dtype, plain_class, probe, probe_device
from mm_kernels.integrations.transformers.registry import SUPPORTED, kind_name_for, unsupported_reason

FLAGS = ("rms_norm", "swiglu", "moe_permute")


class FusedKernelMismatchError(RuntimeError):
    """A fused module kind disagreed with the original in the equivalence probe (``strict=True``)."""


@dataclass
class FusedKernelReport:
    """What :func:`apply_fused_kernels` did.

    ``swapped``: (module name, class name, kind) of every module now running a fused forward;
    ``left_alone``: (module name, class name, reason) of every norm, MLP or experts module that was not.
    ``str(report)`` summarises both, grouped by class. :meth:`undo` restores the original forwards.
    """

    model_class: str
    swapped: list[tuple[str, str, str]] = field(default_factory=list)
    left_alone: list[tuple[str, str, str]] = field(default_factory=list)
    _modules: list[nn.Module] = field(default_factory=list, repr=False)

    def counts(self) -> dict[str, int]:
        """Number of swapped modules per kind."""
        return dict(Counter(kind for _, _, kind in self.swapped))

    def undo(self) -> None:
        """Puts the original forward back on every module this report swapped."""
        for module in self._modules:
            if fused_kind(module) is not None:
                del module.__dict__["forward"]
        self._modules.clear()

    def __str__(self) -> str:
        lines = [f"mm_kernels: {len(self.swapped)} modules of {self.model_class} fused"]
        for (cls, kind), n in sorted(Counter((cls, kind) for _, cls, kind in self.swapped).items()):
            lines.append(f"  {kind}: {n} x {cls}")
        if self.left_alone:
            lines.append(f"left alone: {len(self.left_alone)}")
            for (cls, reason), n in sorted(Counter((cls, reason) for _, cls, reason in self.left_alone).items()):
                lines.append(f"  {n} x {cls}: {reason}")
        return "\n".join(lines)


class FusedForward:
    """A kind's fused forward bound to one module; set as the module's instance ``forward``.

    A plain object rather than a bound method, so that patched models pickle (``torch.save``) and
    deep-copy with their fused forwards.
    """

    def __init__(self, kind_name: str, module: nn.Module) -> None:
        self.kind_name = kind_name
        self.module = module

    def __call__(self, *args, **kwargs):
        return KINDS[self.kind_name].forward(self.module, *args, **kwargs)


def fused_kind(module: nn.Module) -> Kind | None:
    """The kind whose fused forward this module runs, or None."""
    forward = module.__dict__.get("forward")
    return KINDS[forward.kind_name] if isinstance(forward, FusedForward) else None


def _reason_to_skip(module: nn.Module, kind: Kind, enabled: dict[str, bool]) -> str | None:
    if not enabled[kind.flag]:
        return f"{kind.flag}=False"
    if "forward" in module.__dict__:
        return "its forward is already replaced on the instance (e.g. by a hook)"
    return kind.check(module)


def _plan(model: nn.Module, enabled: dict[str, bool], report: FusedKernelReport):
    """Candidates grouped by (class, kind, dtype, device): [(name, module)]; everything else goes to the report."""
    groups: dict[tuple, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        cls = plain_class(module).__name__
        kind_name = kind_name_for(module)
        if fused_kind(module) is not None:
            reason = "already fused"
        elif kind_name is None:
            reason = unsupported_reason(module)
            if reason is None:
                continue
        else:
            reason = _reason_to_skip(module, KINDS[kind_name], enabled)
        if reason is not None:
            report.left_alone.append((name, cls, reason))
            continue
        key = (plain_class(module), kind_name, module_dtype(module), probe_device(module).type)
        groups.setdefault(key, []).append((name, module))
    return groups


def apply_fused_kernels(model: nn.Module, rms_norm: bool = True, swiglu: bool = True, moe_permute: bool = True,
                        strict: bool = False) -> FusedKernelReport:
    """Runs the norms, gated MLPs and MoE experts of ``model`` on mm_kernels' fused ops.

    Swaps the forward of each matching module instance (see ``registry.SUPPORTED``); classes,
    parameters and their names stay as they were, so state dicts, ``save_pretrained``, FSDP2
    ``fully_shard`` (before or after this call), gradient checkpointing and ``torch.compile`` see
    the same model. Works on models built on the meta device. Each distinct (class, kind, dtype) is
    first checked by the equivalence probe; a kind that disagrees stays unfused with one warning,
    or raises :class:`FusedKernelMismatchError` with ``strict=True`` (then nothing is swapped).
    Returns a :class:`FusedKernelReport`; ``report.undo()`` reverts.
    """
    report = FusedKernelReport(plain_class(model).__name__)
    groups = _plan(model, dict(zip(FLAGS, (rms_norm, swiglu, moe_permute), strict=True)), report)
    checked = [(key, members, probe(members[0][1], KINDS[key[1]])) for key, members in groups.items()]
    failed = [(key, result) for key, _, result in checked if not result.ok]
    if failed and strict:
        (cls, kind_name, dtype, _), result = failed[0]
        raise FusedKernelMismatchError(f"mm_kernels: fused {kind_name} does not match {cls.__qualname__} "
                                       f"({dtype}): {result.detail}")
    for (cls, kind_name, dtype, _), members, result in checked:
        if not result.ok:
            warnings.warn(f"mm_kernels: {cls.__qualname__} ({dtype}) left unfused: fused {kind_name} does not "
                          f"match the original: {result.detail}", RuntimeWarning, stacklevel=2)
            report.left_alone.extend((name, cls.__name__, f"probe mismatch: {result.detail}") for name, _ in members)
            continue
        for name, module in members:
            module.forward = FusedForward(kind_name, module)
            report.swapped.append((name, cls.__name__, kind_name))
            report._modules.append(module)
    return report


def _pretrained_bases(model_type: str) -> list[type]:
    """The ``PreTrainedModel`` subclasses defined in the modeling module of ``model_type``."""
    from transformers import PreTrainedModel
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    module_name = model_type_to_module_name(model_type)
    if module_name not in SUPPORTED:
        raise ValueError(f"model type {model_type!r} is not supported; supported: {', '.join(sorted(SUPPORTED))}")
    modeling = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    return [value for value in vars(modeling).values()
            if isinstance(value, type) and value.__module__ == modeling.__name__ and PreTrainedModel in value.__bases__]


_BUILDERS = ("from_pretrained", "_from_config")
_building = [0]  # depth of patched builder calls: only the outermost one fuses (composite models nest them)


def _fusing_builder(builder, patch: ModelTypePatch):
    @functools.wraps(builder)
    def build(cls, *args, **kwargs):
        _building[0] += 1
        try:
            result = builder(cls, *args, **kwargs)
        finally:
            _building[0] -= 1
        if _building[0] == 0:
            model = result[0] if isinstance(result, tuple) else result
            patch.reports.append(apply_fused_kernels(model, **patch.options))
        return result

    return classmethod(build)


class ModelTypePatch:
    """Fuses every model that ``from_pretrained`` / ``from_config`` builds for the given model types.

    Made by :func:`fuse_model_type`. Each built model gets :func:`apply_fused_kernels` with the
    patch's options once it is built (weights loaded); its report is appended to ``reports``.
    :meth:`undo` (or leaving the ``with`` block) stops patching new models; models already built stay
    fused (``report.undo()`` reverts one).
    """

    def __init__(self, model_types: tuple[str, ...], options: dict[str, bool]) -> None:
        self.options = options
        self.reports: list[FusedKernelReport] = []
        self._saved: list[tuple[type, str, object]] = []
        bases = list(dict.fromkeys(base for model_type in model_types for base in _pretrained_bases(model_type)))
        patched = [base.__name__ for base in bases if any(name in base.__dict__ for name in _BUILDERS)]
        if patched:
            raise ValueError(f"{', '.join(patched)} is already patched; undo that patch first")
        for base in bases:
            for name in _BUILDERS:
                self._saved.append((base, name, base.__dict__.get(name)))
                setattr(base, name, _fusing_builder(getattr(base, name).__func__, self))

    def undo(self) -> None:
        """Restores the builders of the patched model types (idempotent)."""
        for base, name, saved in reversed(self._saved):
            if saved is None:
                delattr(base, name)
            else:
                setattr(base, name, saved)
        self._saved.clear()

    def __enter__(self) -> ModelTypePatch:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def fuse_model_type(*model_types: str, rms_norm: bool = True, swiglu: bool = True, moe_permute: bool = True,
                    strict: bool = False) -> ModelTypePatch:
    """Patches model types (``"llama"``, ``"qwen2_5_vl"``, ...) so the models they build come out fused.

    Use before ``from_pretrained``: ``with fuse_model_type("qwen2_5_vl") as patch: model = ...``;
    options as for :func:`apply_fused_kernels`. Only the builders of these model types' classes are
    patched (no module class changes), and only until :meth:`ModelTypePatch.undo`.
    """
    if not model_types:
        raise ValueError("name at least one model type, e.g. fuse_model_type('llama')")
    options = dict(zip(FLAGS, (rms_norm, swiglu, moe_permute), strict=True))
    return ModelTypePatch(model_types, {**options, "strict": strict})
