"""Record features of any module by path (the idea of MMRazor's recorders).

A :class:`FeatureTap` puts forward hooks on modules named by their path in the model
(``"backbone"``, ``"backbone.body.layer3"``) and keeps what they output during the model's own
forward, so the student's features come from the forward that also computes its detection
losses. Outputs may be a dict of maps (an FPN), a list or tuple, or one tensor.

Taps never stack: a new tap on a model first removes any structkd tap already on it. They are
removed by :meth:`FeatureTap.close` or by leaving a ``with`` block, survive ``copy.deepcopy`` and
pickling (the hooks are plain picklable objects), and see through ``DistributedDataParallel``
and ``torch.compile`` wrappers (a tap on a compiled model calls ``torch.compiler.reset()``, so
that code Dynamo compiled before the tap existed is traced again, this time with its hooks).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..detectors.protocol import unwrap

__all__ = ["FeatureTap", "TapsComplete", "as_levels", "find_module", "unwrap"]


class TapsComplete(Exception):  # a signal, not an error
    """Raised inside :meth:`FeatureTap.run_until_complete` once every tapped module has run,
    to skip the rest of the forward (a teacher whose levels are all it is run for)."""


def _is_compiled(model: nn.Module) -> bool:
    """Whether ``torch.compile`` wraps ``model`` (possibly inside DDP / DataParallel)."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            return True
        if not isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            return False
        model = model.module


def find_module(model: nn.Module, path: str, role: str = "model") -> nn.Module:
    """``model.get_submodule(path)`` with an error that lists what exists ("" is the model)."""
    model = unwrap(model)
    if path == "":
        return model
    try:
        return model.get_submodule(path)
    except AttributeError:
        parent, _, _ = path.rpartition(".")
        try:
            options = [n for n, _ in model.get_submodule(parent).named_children()]
        except AttributeError:
            parent, options = "", [n for n, _ in model.named_children()]
        where = f"'{parent}'" if parent else type(model).__name__
        hint = ""
        head = path.split(".")[0]
        if head in ("module", "_orig_mod") and head not in options:
            hint = (f"; paths are relative to the detector inside DDP / DataParallel / "
                    f"torch.compile wrappers: drop the '{head}.' prefix")
        raise ValueError(
            f"{role} ({type(model).__name__}) has no module '{path}'; children of {where}: "
            f"{options}{hint}"
        ) from None


def as_levels(output: Any, prefix: str = "") -> OrderedDict[str, Tensor]:
    """A module output as named maps: dicts keep their keys, lists/tuples are numbered, one
    tensor is ``"0"`` (each key prefixed by ``prefix/`` when given). A dict with one entry that
    holds a list or dict (transformers' ``BaseModelOutput(last_hidden_state=[maps])``) gives
    the maps of that entry."""
    if isinstance(output, Tensor):
        items: list[tuple[str, Any]] = [("0", output)]
    elif isinstance(output, Mapping):
        items = [(str(k), v) for k, v in output.items()]
        if len(items) == 1 and not isinstance(items[0][1], Tensor | str | bytes) and isinstance(
                items[0][1], Mapping | Sequence):
            return as_levels(items[0][1], prefix)
    elif isinstance(output, Sequence) and not isinstance(output, str | bytes):
        items = [(str(i), v) for i, v in enumerate(output)]
    else:
        raise ValueError(f"a tapped module returned {type(output).__name__}; expected a tensor, "
                         "a dict, a list or a tuple of (B, C, H, W) tensors")
    out: OrderedDict[str, Tensor] = OrderedDict()
    for k, v in items:
        if not isinstance(v, Tensor) or v.dim() != 4:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"tapped output '{k}' is {shape}; expected a (B, C, H, W) tensor")
        key = k if not prefix else (prefix if len(items) == 1 else f"{prefix}/{k}")
        out[key] = v
    return out


class _Hook:
    """A forward hook that hands a module's output (or its inputs) to its tap."""

    def __init__(self, tap: FeatureTap, key: str, inputs: bool | str = False) -> None:
        self.tap, self.key, self.inputs = tap, key, inputs
        self.id = -1  # the key of this hook in its module's hook dict, set on registration

    def __call__(self, module: nn.Module, args: tuple, output: Any = None) -> None:
        if self.inputs == "append":  # a module called once per level: every call's output
            self.tap._store.setdefault(self.key, []).append(output)
        elif self.inputs == "both":
            self.tap._record(self.key, (args, output))
        else:
            self.tap._record(self.key, args if self.inputs else output)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A module's hooks are keyed by ids from a per-process counter, which restarts at 0 in a
        # fresh process (DDP spawn unpickles the model there): the next hooks registered on the
        # tapped modules would get this hook's id and silently replace it. Move the counter on.
        self.__dict__.update({"id": -1, **state})
        RemovableHandle.next_id = max(RemovableHandle.next_id, self.id + 1)


def _register(module: nn.Module, hook: _Hook, pre: bool = False) -> None:
    handle = (module.register_forward_pre_hook(hook) if pre
              else module.register_forward_hook(hook))
    hook.id = handle.id


def _remove_hooks(model: nn.Module, owner: FeatureTap | None) -> int:
    """Remove structkd hooks (of ``owner``, or of any tap) from every module of ``model``."""
    removed = 0
    for m in model.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            for hid, h in list(hooks.items()):
                if isinstance(h, _Hook) and (owner is None or h.tap is owner):
                    if owner is None:
                        h.tap._closed = True
                    del hooks[hid]
                    removed += 1
    return removed


class FeatureTap:
    """Records the outputs of modules of ``model`` named by ``paths`` during its forward.

    ``paths``: one path, whose output gives the levels (e.g. ``"backbone"``: an FPN's dict), or a
    list of paths, each giving one level named by its path (or ``path/key`` for dict outputs).
    ``input_path`` names a module whose first positional input is recorded too (the batched
    image tensor), e.g. the tapped root for a model without a batching module;
    ``batch_path`` the module that batches the images (``Detector.batch_path``), whose output
    (the batched images, their sizes and the resized targets) is recorded (see :meth:`batch`);
    ``head_path`` the module of the detector's head, whose input levels and raw predictions are
    recorded (see :meth:`head`).
    :meth:`run_until_complete` runs a forward that stops after the last tapped module.
    """

    def __init__(self, model: nn.Module, paths: str | Sequence[str] = "backbone", *,
                 input_path: str | None = None, batch_path: str | None = None,
                 head_path: str | None = None,
                 cross_paths: dict[str, str | None] | None = None) -> None:
        self.model = unwrap(model)
        self.paths = [paths] if isinstance(paths, str) else list(paths)
        if not self.paths:
            raise ValueError("paths is empty; name at least one module to tap")
        modules = {p: find_module(self.model, p) for p in self.paths}
        # Every path is resolved before anything is touched: a bad one leaves the model as it was.
        input_module = None if input_path is None else find_module(self.model, input_path)
        batch_module = None if batch_path is None else find_module(self.model, batch_path)
        head_module = None if head_path is None else find_module(self.model, head_path)
        self.cross_paths = dict(cross_paths or {})
        cross_modules = {k: find_module(self.model, p) for k, p in self.cross_paths.items()
                         if p is not None}
        _remove_hooks(self.model, None)  # never stack: an older tap on this model is closed
        self._closed = False
        self._store: dict[str, Any] = {}
        self._stop = False
        for p, m in modules.items():
            _register(m, _Hook(self, p))
        self.input_path = input_path
        if input_module is not None:
            _register(input_module, _Hook(self, "__input__", inputs=True), pre=True)
        self.batch_path = batch_path
        if batch_module is not None:
            _register(batch_module, _Hook(self, "__batch__"))
        self.head_path = head_path
        if head_module is not None:
            _register(head_module, _Hook(self, "__head__", inputs="both"))
        for k, m in cross_modules.items():
            _register(m, _Hook(self, f"__cross__{k}", inputs="append"))
        if _is_compiled(model):
            # Dynamo does not guard on hooks added to modules it traced without any
            # (torch._dynamo.config.skip_nnmodule_hook_guards): code compiled before this tap
            # existed would never call it. Drop compiled code; the next call traces the hooks.
            torch.compiler.reset()

    def _record(self, key: str, value: Any) -> None:
        self._store[key] = value
        if self._stop and all(p in self._store for p in self.paths):
            raise TapsComplete

    def run_until_complete(self, module: nn.Module, *args: Any) -> None:
        """Call ``module(*args)`` and stop it as soon as every tapped path has run (a teacher
        run for its levels only); other forwards of the model run in full."""
        self._stop = True
        try:
            module(*args)
        except TapsComplete:
            pass
        finally:
            self._stop = False

    def clear(self) -> None:
        self._store = {}

    def recorded(self, path: str) -> bool:
        """Whether the module at ``path`` ran since the last :meth:`clear`."""
        return path in self._store

    def input(self) -> Any:
        """The recorded input of ``input_path`` (its positional arguments), or None."""
        return self._store.get("__input__")

    def batch(self) -> tuple[Tensor, list[tuple[int, int]], Any]:
        """(images (B, 3, H, W), [(h, w) per image], targets) recorded at ``batch_path``."""
        if "__batch__" not in self._store:
            raise RuntimeError(f"the module '{self.batch_path}' did not run in the last forward")
        images, targets = self._store["__batch__"]
        return images.tensors, [tuple(s) for s in images.image_sizes], targets

    def head(self) -> tuple[list[Tensor], Any]:
        """(the head's input levels, its raw predictions) recorded at ``head_path``."""
        if "__head__" not in self._store:
            raise RuntimeError(f"the head '{self.head_path}' did not run in the last forward")
        args, output = self._store["__head__"]
        return (list(args[0]) if args else []), output  # a model called by keywords: none

    def cross(self) -> dict[str, list[Tensor]]:
        """Per head branch, its feature at the cut, one map per level (``cross_paths``; a
        branch cut at 0 reads the head's input levels)."""
        out = {}
        for k, p in self.cross_paths.items():
            out[k] = self.head()[0] if p is None else list(self._store.get(f"__cross__{k}", []))
            if not out[k]:
                raise RuntimeError(f"the head layer '{p}' did not run in the last forward")
        return out

    def levels(self) -> OrderedDict[str, Tensor]:
        """The recorded maps of the last forward, by level key; raises if nothing was recorded."""
        if self._closed:
            raise RuntimeError("this FeatureTap was closed (or replaced by a newer tap on the "
                               "same model); create a new one")
        missing = [p for p in self.paths if p not in self._store]
        if missing:
            raise RuntimeError(
                f"the tapped modules {missing} did not run in the last forward (a model that "
                "torch.compile traced before the tap was placed on its inner module skips the "
                "tap's hooks until torch.compiler.reset(); tap the compiled wrapper instead)")
        if len(self.paths) == 1:
            return as_levels(self._store[self.paths[0]])
        out: OrderedDict[str, Tensor] = OrderedDict()
        for p in self.paths:
            out.update(as_levels(self._store[p], prefix=p))
        return out

    def close(self) -> None:
        """Remove this tap's hooks; the model runs as if it had never been tapped."""
        _remove_hooks(self.model, self)
        self._closed = True
        self._store = {}

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": {}}  # recorded tensors never travel
