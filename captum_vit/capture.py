"""Layer capture: hooks that record layer outputs (or inputs), stop the forward early and
never outlive the call that set them.

Every hook in captum_vit is registered here. The contract is Captum's
(``captum/_utils/gradient.py``): hooks are removed in ``finally``, so no exception leaves one
behind. What Captum's helpers lack and this module adds:

* **early exit** -- once every requested layer has produced the call it was asked for, the
  hook raises a private exception that :meth:`LayerTap.run` catches, so the modules after
  the last needed layer never run;
* **modules called several times per forward** (CoaT shares ``cpe``/``crpe``/``mlp2``
  across blocks and scales): every call is recorded in order; ``call=k`` selects the k-th
  call (0-based, the default is the first) and lets the forward stop right after it;
  ``call=None`` records all calls and runs the whole forward;
* **captured values stay as captured** -- a value recorded while the forward goes on is
  cloned, as Captum's hooks do, because later in-place ops (a residual ``x += shortcut``,
  ``ReLU(inplace=True)``, writes into a view) would otherwise overwrite it. The record that
  ends the forward early is kept as is: nothing runs after it, so the single-layer path
  pays no copy. With ``keep_graph=True`` the tap keeps the original tensor and hands the
  clone on to the rest of the model instead (Captum's ``forward_hook_with_return``), so
  gradients of the model's output reach the recorded tensor.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "HookSet",
    "LayerTap",
    "capture_layers",
    "find_module",
    "module_name",
    "preserved_state",
    "user_class_name",
]

#: Prefixes tried when a dotted path does not resolve as given: the vision tower of an
#: open_clip CLIP model is ``visual`` and a timm trunk inside open_clip is ``trunk``.
_PATH_PREFIXES = ("visual.", "trunk.", "visual.trunk.", "model.")
#: Path prefixes of the wrappers :func:`peel_wrappers` removes (``torch.compile``,
#: ``DataParallel`` / ``DistributedDataParallel``): names copied from the wrapped model's
#: ``named_modules()`` work without them too.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def peel_wrappers(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile``'s ``OptimizedModule`` and ``DataParallel`` /
    ``DistributedDataParallel`` wrappers (nested ones too), or ``model`` itself.

    Hooks and layer names apply to the inner module, and the package runs it eagerly: a
    compiled forward would recompile for every new set of hooks, and a data-parallel
    wrapper runs replicas whose hooks are not the ones registered.
    """
    while True:
        if type(model).__name__ == "OptimizedModule" and isinstance(
            getattr(model, "_orig_mod", None), nn.Module
        ):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


class _StopForward(BaseException):
    """Raised by a hook to end the forward pass once every needed layer has run.

    A ``BaseException`` so that ``except Exception`` blocks inside user models cannot
    swallow it.
    """


def find_module(model: nn.Module, layer: nn.Module | str) -> tuple[str, nn.Module]:
    """Return ``(dotted_path, module)`` for a layer given as a module or a dotted path.

    Paths are tried as given, then with the open_clip / timm-trunk prefixes
    (``visual.``, ``trunk.``) added or removed, so ``"conv1"`` works on a full CLIP model
    and ``"visual.transformer.resblocks.3"`` on its vision tower. A path that names two
    different modules that way (``"transformer.resblocks.3"`` on a full CLIP model: the
    text transformer's block, and ``visual.transformer.resblocks.3``) is refused.

    Raises:
        ValueError: the path names no module (the message lists the closest real names)
            or is ambiguous (the message names the full paths).
        TypeError: ``layer`` is neither a string nor a module.
    """
    names = dict(model.named_modules())
    if isinstance(layer, nn.Module):
        for name, module in names.items():
            if module is layer:
                return name, module
        raise ValueError(
            f"the layer {type(layer).__name__} is not a submodule of the given "
            f"{type(model).__name__}; pass a module of this model or its dotted path"
        )
    if not isinstance(layer, str):
        raise TypeError(
            f"layer must be an nn.Module or a dotted path string, got {type(layer).__name__}"
        )
    if layer == "":
        return "", model  # the path of the model itself, as named_modules() gives it
    found = [c for c in dict.fromkeys(_path_candidates(layer)) if c and c in names]
    if found:
        if found[0] == layer:  # the same path inside a CLIP image tower is another module
            towers = [c for c in found if c.startswith("visual.") and c.endswith(f".{layer}")]
            _refuse_ambiguous(model, layer, [c for c in towers if names[c] is not names[layer]])
        return found[0], names[found[0]]
    shown, prefix = _as_the_user_sees(model)
    paths = [n[len(prefix) :] for n in names if n.startswith(prefix) and n != prefix[:-1]]
    close = difflib.get_close_matches(layer, [n for n in paths if n], n=5, cutoff=0.5)
    hint = f" Closest names: {', '.join(close)}." if close else ""
    raise ValueError(
        f"unknown layer {layer!r} in {shown}.{hint} "
        "See `dict(model.named_modules())` for every name."
    )


def _as_the_user_sees(model: nn.Module) -> tuple[str, str]:
    """``(class name, path prefix)`` of the model the user holds inside the package's
    wrappers (``ImageModel``, ``HFVisionModel``), which set ``wrapped_prefix`` to the
    attribute path of what they wrap (``"model."``): error messages name that model and
    its own paths, which the methods accept as well."""
    prefix = ""
    while getattr(model, "wrapped_prefix", ""):
        inner = model.wrapped_prefix
        prefix += inner
        model = getattr(model, inner[:-1])
    return user_class_name(model), prefix


def user_class_name(model: nn.Module) -> str:
    """The class name of the model the user holds: inside the package's wrappers, the
    wrapped model's (``CLIPModel`` for the image tower a ``HFVisionModel`` runs of it)."""
    while getattr(model, "wrapped_prefix", ""):
        model = getattr(model, model.wrapped_prefix[:-1])
    return getattr(model, "wrapped_class_name", None) or type(model).__name__


def _refuse_ambiguous(model: nn.Module, layer: str, others: list[str]) -> None:
    """A path that names one module as given and another inside the image tower ``visual``
    (the text transformer ``transformer.resblocks.5`` of a full CLIP model and the image
    tower's ``visual.transformer.resblocks.5``) must be spelled out. (``"head"`` of an
    open_clip timm tower is its own projection, not ``trunk.head``: no ambiguity.)"""
    if not others:
        return
    choices = ", ".join(repr(name) for name in [layer, *others])
    raise ValueError(
        f"layer {layer!r} is ambiguous in {type(model).__name__}: it names {choices}. "
        f"Pass the full path, e.g. {others[0]!r}"
        + (" for the image tower" if others[0].startswith("visual.") else "")
    )


def _path_candidates(path: str) -> list[str]:
    bases = [path] + [path[len(w) :] for w in _WRAPPER_PREFIXES if path.startswith(w)]
    candidates = []
    for base in bases:
        candidates.append(base)
        for prefix in _PATH_PREFIXES:
            candidates.append(prefix + base)
            if base.startswith(prefix):
                candidates.append(base[len(prefix) :])
    return candidates


def module_name(model: nn.Module, module: nn.Module) -> str:
    """Dotted path of ``module`` inside ``model`` (``""`` for the model itself)."""
    return find_module(model, module)[0]


def _refuse_container(model: nn.Module, name: str, module: nn.Module) -> None:
    """A ``ModuleList`` / ``ModuleDict`` (any module without a ``forward``) is never called:
    the model calls the modules inside it, so it has no output to record."""
    if getattr(type(module), "forward", None) is not nn.Module.forward:
        return
    path = _user_path(model, name)
    called = [f"{path}.{child}" if path else child for child in _called_inside(module)]
    shown = ", ".join(repr(c) for c in called[:4]) + (", ..." if len(called) > 4 else "")
    raise ValueError(
        f"layer {path!r} is a {type(module).__name__}, a container that is never called "
        "itself (the model's forward calls the modules inside it), so it has no output to "
        "record" + (f": pass one of the modules inside it, {shown}" if called else "")
    )


def _user_path(model: nn.Module, name: str) -> str:
    """``name`` (a path in ``model``) as the user names it: without the package's wrapper
    prefix (``"model.blocks.2"`` inside ``ImageModel`` is the user's ``"blocks.2"``)."""
    _, prefix = _as_the_user_sees(model)
    return name[len(prefix) :] if name.startswith(prefix) else name


def _called_inside(container: nn.Module) -> list[str]:
    """Relative paths of the outermost modules inside a container that have a forward
    (through nested containers: Twins' ``blocks`` holds one ``ModuleList`` per stage)."""
    paths = []
    for child_name, child in container.named_children():
        if getattr(type(child), "forward", None) is nn.Module.forward:
            paths += [f"{child_name}.{inner}" for inner in _called_inside(child)]
        else:
            paths.append(child_name)
    return paths


class LayerTap:
    """Records the outputs (or inputs) of one or several layers during forward passes.

    Use it as a context manager (hooks exist only inside the ``with`` block) and call
    :meth:`run` as many times as needed; each run returns what the layers produced.

    Args:
        model: the module whose forward is run.
        layers: one layer or a sequence of layers (modules or dotted paths).
        attribute_to_layer_input: record the first positional input of each layer instead
            of its output (for example the input of ``mlp.fc2``, the hidden layer of a
            SwiGLU MLP).
        call: which call of each layer to keep when a module runs several times per
            forward: an int (0-based; negative counts from the end and needs the full
            forward) or ``None`` for every call (a list per layer).
        early_exit: stop the forward right after the last needed layer call.
        watch: optional ``watch(name, module, output)`` called after every module of the
            model in forward order (used by the layout resolver to gather evidence);
            ``marks[i]`` then holds, for every recorded call of layer ``i``, how many
            watch calls happened before it.
        keep_graph: record the layer's own tensor and pass a clone on to the rest of the
            forward, so that the recorded tensor lies on the path to the model's output
            (for gradients of the output with respect to it). By default the tap records
            a clone and the model goes on with its own tensor.
        on_record: ``on_record(i, value)`` is handed layer ``i``'s selected call the
            moment the layer produces it, before the forward goes on, so no copy is made;
            the value must not be kept or modified, and :meth:`run` then returns ``None``
            for every layer. Needs ``call >= 0``.

    Examples::

        >>> with LayerTap(model, ["blocks.3", "blocks.5.mlp.fc1"]) as tap:
        ...     block3, fc1 = tap.run(images)
    """

    def __init__(
        self,
        model: nn.Module,
        layers: nn.Module | str | Sequence[nn.Module | str],
        *,
        attribute_to_layer_input: bool = False,
        call: int | None = 0,
        early_exit: bool = True,
        watch: Callable[[str, nn.Module, Any], None] | None = None,
        keep_graph: bool = False,
        on_record: Callable[[int, Any], None] | None = None,
    ) -> None:
        if isinstance(layers, (str, nn.Module)):
            layers = [layers]
        if len(layers) == 0:
            raise ValueError("LayerTap needs at least one layer")
        if call is not None and not isinstance(call, int):
            raise TypeError(f"call must be an int or None, got {type(call).__name__}")
        if on_record is not None and (call is None or call < 0):
            raise ValueError("on_record needs call >= 0 (a call known when it happens)")
        self.model = model = peel_wrappers(model)
        resolved = [find_module(model, layer) for layer in layers]
        for name, module in resolved:
            _refuse_container(model, name, module)
        self.names = [name for name, _ in resolved]
        self.modules = [module for _, module in resolved]
        self.attribute_to_layer_input = attribute_to_layer_input
        self.call = call
        self.early_exit = early_exit and call is not None and call >= 0
        self.watch = watch
        self.keep_graph = keep_graph
        self.on_record = on_record
        self._hooks = HookSet()
        self._records: list[list[Any]] = []
        self._watched = 0
        self.marks: list[list[int]] = []

    def __enter__(self) -> LayerTap:
        try:
            for index, module in enumerate(self.modules):
                self._register(index, module)
            if self.watch is not None:
                # Registered after the layer hooks: on the layer itself the record (and a
                # possible early exit) comes first, so a mark excludes the layer's output.
                for name, module in self.model.named_modules():
                    self._hooks.forward(module, self._watch_hook(name))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this tap registered (idempotent)."""
        self._hooks.remove()

    def _register(self, index: int, module: nn.Module) -> None:
        # A module listed twice gets one hook per listing; each records into its own slot.
        if self.attribute_to_layer_input:

            def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> Any:
                if args:
                    passed = self._record(index, args[0])
                    return None if passed is args[0] else ((passed, *args[1:]), kwargs)
                key = next(iter(kwargs))
                passed = self._record(index, kwargs[key])
                return None if passed is kwargs[key] else (args, {**kwargs, key: passed})

            self._hooks.pre_forward(module, pre_hook, with_kwargs=True)
            return

        def hook(_module: nn.Module, _args: tuple, output: Any) -> Any:
            passed = self._record(index, output)
            return None if passed is output else passed

        self._hooks.forward(module, hook)

    def _watch_hook(self, name: str) -> Callable[[nn.Module, tuple, Any], None]:
        def hook(module: nn.Module, _args: tuple, output: Any) -> None:
            self._watched += 1
            self.watch(name, module, output)

        return hook

    def _record(self, index: int, value: Any) -> Any:
        """Record ``value``; return the value the forward goes on with.

        The forward may overwrite what it goes on with in place, so when it goes on the
        recorded value and the passed one are different copies. Raises ``_StopForward``
        (nothing is copied) once every needed call has been recorded.
        """
        calls = self._records[index]
        if self.on_record is not None:
            if len(calls) == self.call:
                self.on_record(index, value)
            value, kept = None, value  # handed over, not kept: no copy needed
        calls.append(value)
        self.marks[index].append(self._watched)
        if self.early_exit and self._all_needed_calls_seen():
            raise _StopForward
        if self.on_record is not None:
            return kept
        if not self._is_returned(len(calls) - 1):
            return value  # a call that run() never returns: no copy needed
        if self.keep_graph:
            return _clone(value)
        calls[-1] = _clone(value)
        return value

    def _is_returned(self, position: int) -> bool:
        """Whether the ``position``-th recorded call can be part of :meth:`run`'s result
        (negative ``call`` values count from an end not known yet: keep every call)."""
        return self.call is None or self.call < 0 or position == self.call

    def _all_needed_calls_seen(self) -> bool:
        return all(len(calls) > self.call for calls in self._records)

    def run(self, *inputs: Any, **kwargs: Any) -> list[Any]:
        """Run the model and return, per layer, the selected call's value (or all calls).

        Raises:
            RuntimeError: a layer did not run, or ran fewer times than ``call`` asks.
        """
        if not self._hooks:
            raise RuntimeError("LayerTap.run must be called inside `with LayerTap(...)`")
        self._records = [[] for _ in self.modules]
        self.marks = [[] for _ in self.modules]
        self._watched = 0
        try:
            self.model(*inputs, **kwargs)
        except _StopForward:
            pass
        records, self._records = self._records, []
        return [self._select(name, calls) for name, calls in zip(self.names, records, strict=True)]

    def _select(self, name: str, calls: list[Any]) -> Any:
        if self.call is None:
            if not calls:
                raise RuntimeError(
                    f"layer {_user_path(self.model, name)!r} did not run during the forward pass"
                )
            return calls
        if not -len(calls) <= self.call < len(calls):
            raise RuntimeError(
                f"layer {_user_path(self.model, name)!r} ran {len(calls)} time(s) in the forward pass, "
                f"so call={self.call} does not exist"
                + (self._why_not_run(name) if not calls else "")
            )
        return calls[self.call]

    def _why_not_run(self, name: str) -> str:
        """A hint for a module that exists but never ran."""
        parent_name, _, child = name.rpartition(".")
        parent = dict(self.model.named_modules()).get(parent_name)
        if child == "attn_drop" and getattr(parent, "fused_attn", False):
            return (
                f". {type(parent).__name__} computes attention with "
                "F.scaled_dot_product_attention (fused_attn=True), which never calls "
                "attn_drop: the attention probabilities are no module's output (read them "
                "with AttentionRollout, or set fused_attn=False on the model's attention "
                "modules)"
            )
        return ": the model's forward does not use it (for this input)"


def _clone(value: Any) -> Any:
    """A copy of every tensor in ``value`` (tensors, and tuples / lists / dicts of them);
    the copy stays in the autograd graph."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # named tuples
        return type(value)(*(_clone(item) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(item) for item in value)
    if isinstance(value, dict):
        return {key: _clone(item) for key, item in value.items()}
    return value


def capture_layers(
    model: nn.Module,
    layers: nn.Module | str | Sequence[nn.Module | str],
    *inputs: Any,
    attribute_to_layer_input: bool = False,
    call: int | None = 0,
    early_exit: bool = True,
    grad: bool = False,
) -> Any:
    """One forward pass that returns what the given layer(s) produced.

    Args:
        model: the module to run.
        layers: a module or dotted path, or a sequence of them.
        *inputs: the forward's arguments, passed as they are: a timm model takes
            normalized images (wrap it in :class:`~captum_vit.models.ImageModel` to pass
            RGB images in [0, 1]).
        attribute_to_layer_input: record the layers' inputs instead of their outputs.
        call: which call to keep of a module that runs several times per forward: an
            int (0-based; negative counts from the end) or ``None`` for every call (a
            list per layer).
        early_exit: stop the forward once every layer has produced its value.
        grad: keep the autograd graph (``False``: run under ``torch.no_grad()``).

    Returns:
        For a single layer its value; for a sequence of layers a list in the same order.

    Examples::

        >>> fc1 = capture_layers(model, "blocks.3.mlp.fc1", images)   # stops after it
        >>> a, b = capture_layers(model, ["blocks.1", "blocks.2"], images, grad=True)
    """
    single = isinstance(layers, (str, nn.Module))
    with (
        autograd(grad),
        LayerTap(
            model,
            layers,
            attribute_to_layer_input=attribute_to_layer_input,
            call=call,
            early_exit=early_exit,
        ) as tap,
    ):
        values = tap.run(*inputs)
    return values[0] if single else values


class HookSet:
    """Hooks registered together and removed together when the ``with`` block ends, also
    after an error (one raised while registering included). Outside :class:`LayerTap`,
    every hook of captum_vit goes through one (the patch-grid splice, the rollout's
    attention readers).

    Examples::

        >>> with HookSet() as hooks:
        ...     hooks.forward(model.blocks[3], lambda module, args, output: seen.append(output))
        ...     model(images)
    """

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def forward(self, module: nn.Module, hook: Callable[..., Any]) -> None:
        """``hook(module, args, output)`` after ``module`` runs (a returned value replaces
        the output)."""
        self._handles.append(module.register_forward_hook(hook))

    def pre_forward(
        self, module: nn.Module, hook: Callable[..., Any], *, with_kwargs: bool = False
    ) -> None:
        """``hook(module, args)`` (``hook(module, args, kwargs)`` with ``with_kwargs``)
        before ``module`` runs."""
        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs))

    def __bool__(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        """Remove every hook of the set (idempotent)."""
        while self._handles:
            self._handles.pop().remove()


def outside_inference_mode(method: Callable) -> Callable:
    """Run ``method`` with inference mode off: a method that takes gradients creates
    tensors (its image parameter, normalized copies) that autograd must be able to save,
    also when it is called inside the user's ``torch.inference_mode()`` block."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False):
            return method(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def autograd(enabled: bool = True) -> Iterator[None]:
    """Record the autograd graph (``enabled``) or not, whatever the caller's context: the
    methods that take gradients (feature visualization, the locality probe) work inside
    a user's ``torch.no_grad()`` or ``torch.inference_mode()`` block."""
    if not enabled:
        with torch.no_grad():
            yield
        return
    with torch.inference_mode(False), torch.enable_grad():
        yield


@contextlib.contextmanager
def preserved_state(
    model: nn.Module, *, eval_mode: bool = True, freeze: bool = True
) -> Iterator[nn.Module]:
    """Temporarily put ``model`` in eval mode and turn off parameter gradients.

    On exit -- also after an exception -- every module's ``training`` flag and every
    parameter's ``requires_grad`` are restored exactly as they were.
    """
    training = [(module, module.training) for module in model.modules()]
    flags = [(param, param.requires_grad) for param in model.parameters()]
    try:
        if eval_mode:
            model.eval()
        if freeze:
            for param, _ in flags:
                param.requires_grad_(False)
        yield model
    finally:
        for module, was_training in training:
            module.training = was_training
        for param, required in flags:
            param.requires_grad_(required)
