"""`OREPAConv`: the training-time stand-in for a conv that generates its kernel from six linear branches."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, cast

import torch
import torch.fx
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.conv import _ConvNd

from ..config import OREPAConfig
from ..errors import OREPALayoutError
from .inits import INITIALISERS
from .runtime import (
    EXPORT_UNFOLDED,
    autocast_off,
    generate_kernels,
    generation_ahead_allowed,
    generation_dtype,
    traced_generation,
)
from .spec import PARAMETER_NAMES, BlockSpec, SavedLayout, upgrade_v1_state
from .support import runs_plain_forward, unsupported_reason


class OREPAConv(nn.Module):
    """An OREPA block in place of ``conv``: six linear branches squeezed into one kernel every forward.

    The wrapped conv keeps its class, hyper-parameters and forward semantics (padding mode, run-time
    'same' padding of timm's ``Conv2dSame``); only its weight is generated. ``fold()`` (alias ``fuse()``,
    which timm's ``reparameterize_model`` calls) returns that conv with the generated kernel, computed in
    float64. Parameters: ``weight_origin``, ``weight_taps`` (the 1x1 weights of ``avg``/``prior``/``pw``
    stacked on axis 1), ``weight_pw_kxk_in``/``weight_pw_kxk``, ``weight_dws_dw``/``weight_dws_pw``,
    one 1-D ``scales`` vector holding every branch's per-channel scale (:meth:`scale`), and the conv's ``bias``
    when it has one. Few, large tensors keep the per-step and per-optimizer-step overhead low.

    Args:
        conv: an ``nn.Conv1d/2d/3d`` (or a subclass that keeps its forward) or timm ``Conv2dSame`` with more than
            one kernel tap.
            It is taken over: its weight and bias move into the block.
        config: branch set, widths and init (see :class:`OREPAConfig`); selection fields are ignored here.
        generator: source of the random branch weights; by default a fresh one seeded with ``config.seed``.
            The global RNG is never used.
    """

    # Declared for type checkers (nn.Module.__getattr__ is typed "Tensor | Module"); set in __init__.
    _conv: _ConvNd
    scales: nn.Parameter
    weight_origin: nn.Parameter
    weight_taps: nn.Parameter
    bias: nn.Parameter | None

    def __init__(
        self, conv: _ConvNd, config: OREPAConfig | None = None, *, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if isinstance(conv, OREPAConv):
            raise TypeError("conv is already an OREPAConv")
        if not isinstance(conv, nn.Module):
            raise TypeError(f"OREPAConv wraps a conv module, got {type(conv).__name__}")
        reason = unsupported_reason(conv, pointwise=True)
        if reason is not None:
            raise ValueError(f"cannot convert {type(conv).__name__}: {reason}")
        config = config or OREPAConfig()
        weight = cast(nn.Parameter, conv.weight)
        self.spec: BlockSpec = BlockSpec.for_conv(conv, config)
        gen = generator if generator is not None else torch.Generator().manual_seed(config.seed)
        for name, value in INITIALISERS[config.init](self.spec, weight, gen).items():
            param = value if isinstance(value, nn.Parameter) else nn.Parameter(value, weight.requires_grad)
            self.register_parameter(name, param)
        self._plan = self.spec.plan()

        # Take the conv over: its weight is generated from now on, its bias lives here.
        bias = conv._parameters["bias"] if "bias" in conv._parameters else None
        self.register_parameter("bias", bias)
        del conv._parameters["weight"]
        conv._parameters["bias"] = None
        object.__setattr__(self, "_conv", conv)  # not a submodule: it holds no tensors
        # The fixed tap filters [O, B, kk] and the 1x1->kxk identity [t, I/g]: non-persistent buffers (out of
        # the state_dict), rebuilt by _apply from exact values in float32 (float64 for float64 parameters), so
        # .half() never rounds them further.
        self.register_buffer("tap_filters", None, persistent=False)
        self.register_buffer("pw_kxk_identity", None, persistent=False)
        self._refresh_constants()
        self.train(conv.training)

    # ------------------------------------------------------------------ conv attributes
    @property
    def conv(self) -> _ConvNd:
        """The wrapped conv (without weight while the block is active)."""
        return self._conv

    branches = property(lambda self: self.spec.branches, doc="The block's branches, in BRANCHES order.")
    init = property(lambda self: self.spec.init)

    @property
    def eval_cache(self) -> bool:
        """Whether the generated kernel is cached in eval mode (see :class:`OREPAConfig`); settable."""
        return self.spec.eval_cache

    @eval_cache.setter
    def eval_cache(self, value: bool) -> None:
        self.spec = dataclasses.replace(self.spec, eval_cache=bool(value))
        self.__dict__.pop("_kernel_cache", None)

    pw_kxk_width = property(lambda self: self.spec.width, doc="Internal width t of the 1x1->kxk branch.")
    dws_expansion = property(lambda self: self.spec.expansion)
    live_scale = property(lambda self: self.spec.live_scale)
    seed = property(lambda self: self.spec.seed)

    in_channels = property(lambda self: self._conv.in_channels)
    out_channels = property(lambda self: self._conv.out_channels)
    kernel_size = property(lambda self: self._conv.kernel_size)
    stride = property(lambda self: self._conv.stride)
    padding = property(lambda self: self._conv.padding)
    dilation = property(lambda self: self._conv.dilation)
    groups = property(lambda self: self._conv.groups)
    padding_mode = property(lambda self: self._conv.padding_mode)

    @property
    def weight(self) -> Tensor:
        """The generated kernel (read-only; computed from the branches, cached in eval)."""
        return self._kernel()

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "weight":
            raise AttributeError(
                "OREPAConv generates its weight from its branches and it cannot be assigned; call "
                "orepa_convert.fold_orepa(model) (or block.fold()) first to get a plain conv, e.g. before "
                "fusing BN or exporting"
            )
        super().__setattr__(name, value)

    # ------------------------------------------------------------------ branches
    def scale(self, branch: str) -> Tensor:
        """The per-output-channel scale ``[O]`` of ``branch``: a view into ``scales`` (in-place edits apply)."""
        return self.scales.view(len(self.branches), -1)[self._branch_index(branch)]

    def branch_weight(self, branch: str) -> Tensor:
        """The weight of a fixed-filter 1x1 branch (``avg``, ``prior``, ``pw``) as ``[O, I/g]``: a view into
        ``weight_taps``."""
        taps = self.spec.tap_branches
        if branch not in taps:
            raise ValueError(f"{branch!r} is not a fixed-filter 1x1 branch of this block (it has {taps})")
        return self.weight_taps[:, taps.index(branch)]

    def _branch_index(self, branch: str) -> int:
        if branch not in self.branches:
            raise ValueError(f"this block has no branch {branch!r}; its branches are {self.branches}")
        return self.branches.index(branch)

    # ------------------------------------------------------------------ kernel generation
    def _refresh_constants(self) -> None:
        """(Re)build the fixed buffers from their exact float64 values on the parameters' device, in the dtype
        the kernel is generated in."""
        scales = self.scales
        dtype = torch.float64 if scales.dtype == torch.float64 else torch.float32
        target = (scales.device, dtype)
        current = [b for b in (self._buffers.get("tap_filters"), self._buffers.get("pw_kxk_identity")) if b is not None]
        if self.__dict__.get("_constants_built") == target and all((b.device, b.dtype) == target for b in current):
            return  # built for this device and dtype and untouched (e.g. .float() of a float32 block): keep them
        filters, identity = self.spec.fixed_tensors(dtype, scales.device)
        if filters is not None:
            self.tap_filters = filters  # [O, B, kk]
        if identity is not None:
            self.pw_kxk_identity = identity  # [t, I/g]
        self.__dict__["_constants_built"] = target

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        super()._apply(fn, recurse)
        self._refresh_constants()
        return self

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "spec" not in state:  # pickled before blocks held a BlockSpec: its fields were attributes
            state = dict(state)
            plan, width = state["_plan"], state.pop("pw_kxk_width")
            multiplier = state.pop("pw_kxk_multiplier", width // (plan.in_per_group * plan.groups))
            state["spec"] = BlockSpec(
                shape=tuple(plan.shape),
                groups=plan.groups,
                branches=tuple(state.pop("branches")),
                width=width,
                expansion=state.pop("dws_expansion"),
                init=state.pop("init"),
                seed=state.pop("seed", 0),
                live_scale=state.pop("live_scale", 1.0),
                eval_cache=state.pop("eval_cache", True),
                pw_kxk_multiplier=multiplier,
            )
        super().__setstate__(state)
        self._plan = self.spec.plan()  # derived, so not pickled (nor tied to the generation module's path)
        if "tap_filters" not in self._buffers:  # pickled by a version that kept them in a cache
            self._buffers.update(tap_filters=None, pw_kxk_identity=None)
            self._non_persistent_buffers_set.update(("tap_filters", "pw_kxk_identity"))
            self._refresh_constants()

    def generation_inputs(self) -> list[Tensor]:
        """The block's parameter tensors in :attr:`~.generation.GenerationPlan.kinds` order."""
        params = self._parameters
        return [cast(Tensor, params[PARAMETER_NAMES[kind]]) for kind in self._plan.kinds]

    def generate_kernel(self, compute_dtype: torch.dtype | None = None) -> Tensor:
        """Generate the kernel ``[O, I/g, *K]`` in the parameters' dtype.

        It is computed in ``compute_dtype`` (default: :func:`generation_dtype`) with autocast off, so mixed
        precision never changes the trained function. Under ``torch.compile`` and ``torch.func`` it is built from
        plain differentiable ops, otherwise as one fused autograd node.
        """
        scales = self.scales
        dtype = compute_dtype or generation_dtype(scales.dtype)
        with autocast_off(scales.device):
            kernel = generate_kernels(self._plan, [self], dtype)[0]
        return kernel if kernel.dtype == scales.dtype else kernel.to(scales.dtype)

    def _cache_key(self) -> tuple:
        return tuple(
            (id(p), p.data_ptr(), p._version, p.dtype, p.device) for p in self._parameters.values() if p is not None
        )

    @property
    def frozen(self) -> bool:
        """Whether no parameter of the block requires grad."""
        return not any(p.requires_grad for p in self._parameters.values() if p is not None)

    def _kernel(self) -> Tensor:
        """The kernel for this forward pass: one generated ahead for it if still valid; else from the cache (in
        eval mode while autograd is not recording, or in any mode while no parameter requires grad) if no
        parameter changed (version counters, storage, dtype, device); else generated now."""
        if traced_generation():
            if not self.training and torch.compiler.is_exporting():
                warnings.warn(EXPORT_UNFOLDED, stacklevel=2)
            return self.generate_kernel()
        if torch.jit.is_tracing():
            return self._kernel_as_trace_constant()
        ahead = self.__dict__.pop("_ahead", None)
        if ahead is not None and ahead[0] == self._cache_key() and generation_ahead_allowed():
            return ahead[1]
        # Frozen blocks (no parameter requires grad, e.g. ultralytics freeze=) use the cache in training too.
        cacheable = self.eval_cache and (self.frozen or (not self.training and not torch.is_grad_enabled()))
        if not cacheable:
            return self.generate_kernel()
        key = self._cache_key()
        cached = self.__dict__.get("_kernel_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        kernel = self.generate_kernel()
        self.__dict__["_kernel_cache"] = (key, kernel)
        return kernel

    def _kernel_as_trace_constant(self) -> Tensor:
        """The generated kernel, computed with the TorchScript tracer suspended, so that ``torch.jit.trace`` and
        the TorchScript-based ONNX exporter (``torch.onnx.export(..., dynamo=False)``) record it as a constant:
        the traced graph is the folded conv, with this block's numbers (the tracer does not record the in-place
        accumulation of the fused generation faithfully)."""
        tracing = cast(Any, torch._C)  # the TorchScript tracer's switch is not in torch's stubs
        state = tracing._get_tracing_state()
        tracing._set_tracing_state(None)
        try:
            with torch.no_grad():
                return self.generate_kernel()
        finally:
            tracing._set_tracing_state(state)

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` hook: an unfolded block cannot be scripted (its generation is Python); say so."""
        raise RuntimeError(
            "torch.jit.script cannot compile an unfolded OREPA block; call orepa_convert.fold_orepa(model) first "
            "(or script a folded copy: fold_orepa(copy.deepcopy(model))). torch.jit.trace and "
            "torch.onnx.export work on unfolded models and record each block as its folded conv"
        )

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy):
            return self._fx_opaque_call(x)
        kernel = self._kernel()
        conv = self._conv
        if runs_plain_forward(type(conv)) and not (conv._forward_hooks or conv._forward_pre_hooks):
            return conv._conv_forward(x, kernel, self.bias)
        # Any other supported class (run-time 'same' padding) or a conv with hooks: call it as itself.
        tensors = {"weight": kernel} if self.bias is None else {"weight": kernel, "bias": self.bias}
        return functional_call(conv, tensors, (x,))

    def _fx_opaque_call(self, x: torch.fx.Proxy) -> torch.fx.Proxy:
        """Under ``torch.fx`` symbolic tracing (``symbolic_trace``, torchvision's ``create_feature_extractor``,
        timm's fx features, FX quantization), record this block as one opaque ``call_module`` node, whatever the
        tracer's leaf rules: the GraphModule then holds the block itself, so its parameters stay trainable (they
        are shared with the traced model) and its generation runs as in eager mode. Tracing through it instead
        would bake the kernel generated from the current values into the graph as a constant."""
        tracer = cast(torch.fx.Tracer, x.tracer)
        return tracer.create_proxy("call_module", tracer.path_of_module(self), (x,), {})

    # ------------------------------------------------------------------ deployment
    @torch.no_grad()
    def fold(self) -> nn.Module:
        """Return the wrapped conv (same object and class) holding the generated kernel, computed in float64
        and cast to the parameter dtype. The block stays usable; folding again gives the same values."""
        ref = next(p for p in self._parameters.values() if p is not None)
        kernel = self.generate_kernel(torch.float64)
        conv = self._conv
        conv.weight = nn.Parameter(kernel.to(ref.dtype).contiguous(), requires_grad=ref.requires_grad)
        conv.register_parameter("bias", self.bias)
        conv.train(self.training)
        return conv

    def fuse(self) -> nn.Module:
        """timm ``reparameterize_model`` hook: the folded conv that replaces this block."""
        return self.fold()

    # ------------------------------------------------------------------ state
    def block_config(self) -> OREPAConfig:
        """The :class:`OREPAConfig` (block fields only) that builds this block again; see :mod:`.state`."""
        return self.spec.config()

    def get_extra_state(self) -> Tensor:
        """The saved layout (:class:`~orepa_convert.spec.SavedLayout`) as a small int64 tensor."""
        return self.spec.layout().encode()

    def set_extra_state(self, state: Any) -> None:
        problem = self.spec.layout_problem(state)
        if problem:
            raise OREPALayoutError(problem)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):  # type: ignore[no-untyped-def]
        name = prefix[:-1] or type(self).__name__
        if prefix + "weight" in state_dict and prefix + "weight_origin" not in state_dict:
            error_msgs.append(
                f"{prefix}weight is a plain conv weight but {name} is an OREPA block: load plain weights "
                f"before convert_to_orepa(), or fold the model first"
            )
            return
        extra = state_dict.get(prefix + "_extra_state")
        saved = None if extra is None else SavedLayout.decode(extra)
        if saved is not None and saved.version == 1 and saved.readable:
            upgrade_v1_state(state_dict, prefix, saved)
            extra = state_dict[prefix + "_extra_state"]
        problem = None if extra is None else self.spec.layout_problem(extra)
        if problem:
            error_msgs.append(f"{name}: {problem}")
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_kernel_cache", None)  # derived, device-bound: never pickled or deep-copied
        state.pop("_ahead", None)
        state.pop("_plan", None)
        return state

    def extra_repr(self) -> str:
        c = self._conv
        return (
            f"{type(c).__name__}({c.in_channels}, {c.out_channels}, kernel_size={c.kernel_size}, stride={c.stride}, "
            f"groups={c.groups}), branches={self.branches}, init={self.init!r}"
        )
