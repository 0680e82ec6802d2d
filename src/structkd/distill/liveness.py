"""Distillation that cannot be silently off: the start-up checks of a ``Distiller``.

The usual ways a distillation run quietly trains a plain detector: a tap on a module the forward
never calls (or a path with DDP's ``module.`` prefix), a tapped list of layers that pairs with
nothing, a teacher whose maps are constant (untrained, or the wrong module), a term whose value
never reaches the student's parameters (a detached tap, frozen layers, a method returning a
constant), a weight of 0. :func:`check_distillation` runs one probing step on a real batch and
raises one ``ValueError`` naming the tap, level or parameter group; it leaves the student's
statistics and the random state as they were.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .balance import preserved_state, split_losses, student_parameters, total_norm

if TYPE_CHECKING:
    from .distiller import Distiller

logger = logging.getLogger("structkd.distill")

__all__ = ["check_distillation"]


def _groups(names: Sequence[str], depth: int = 2) -> list[str]:
    """Parameter names grouped by their first ``depth`` path parts, in order."""
    out: list[str] = []
    for n in names:
        g = ".".join(n.split(".")[:depth])
        if g not in out:
            out.append(g)
    return out


def check_distillation(distiller: Distiller, images: list[Tensor],
                       targets: list[dict[str, Tensor]]) -> dict[str, Any]:
    """Check on one batch that ``distiller`` really distils; raise ``ValueError`` if not.

    Checked: every student tap fired and every tapped layer of an explicit list paired with a
    teacher level; every paired student level depends on trainable parameters; no teacher
    level is constant; the distillation term is finite and, unless
    the weight is 0 on purpose (an error: use method "none"), non-zero; its gradient reaches
    the student's trainable parameters with a non-zero norm. Returns what was seen (levels,
    term value, reached parameter groups) for the log.
    """
    s_unpaired, t_unpaired = distiller.unpaired
    layers = distiller.student_layers
    if len(layers) > 1:
        lost = [p for p in layers if not any(k == p or k.startswith(p + "/") for k in
                                             {pair.student for pair in distiller.pairs})]
        if lost:
            raise ValueError(f"the tapped student layer(s) {lost} pair with no teacher level "
                             f"(paired: {[p.name for p in distiller.pairs]}; unpaired student "
                             f"levels {s_unpaired}, teacher levels {t_unpaired}): they would "
                             "not be distilled")
    if s_unpaired:
        logger.info("student levels %s have no teacher level of their stride and are not "
                    "distilled", s_unpaired)
    if distiller.weight == 0 and not distiller.auto_weight:
        raise ValueError("the method's weight is 0: the distillation term would be 0 for the "
                         "whole run; use method 'none' to train without distillation")
    params = student_parameters(distiller)
    if not params:
        raise ValueError("the student has no trainable parameters (all requires_grad=False)")
    with preserved_state(distiller), distiller.probing(
            weight=1.0 if distiller.auto_weight else None):
        distiller.train()
        try:
            losses = distiller(images, targets)
        except RuntimeError as e:
            if "did not run in the last forward" in str(e):
                raise ValueError(f"student tap: {e}") from None
            raise
        _, term = split_losses(losses)
        assert term is not None
        value = float(term.detach())
        if not torch.isfinite(term.detach()):
            raise ValueError(f"the distillation term is {value} on the first batch; expected a "
                             "finite value (per level: " + _levels(distiller) + ")")
        grads = (torch.autograd.grad(term, [p for _, p in params], allow_unused=True)
                 if term.requires_grad else (None,) * len(params))
        t_levels, s_trainable = distiller.last_teacher, distiller.last_student_trainable
        distiller.last_teacher, distiller.last_student_trainable = {}, {}
    for name, t in t_levels.items():
        t = t.detach().float()
        if t.numel() and float(t.max() - t.min()) == 0.0:
            pair = next(p for p in distiller.pairs if p.name == name)
            raise ValueError(f"the teacher's level {name} (its tapped map {pair.teacher!r}) is "
                             f"constant ({float(t.flatten()[0]):.4g}) on the first batch: an "
                             "untrained teacher or a tap on the wrong module gives the student "
                             "nothing to learn")
    reached = [n for (n, _), g in zip(params, grads, strict=True) if g is not None]
    if not reached:
        raise ValueError(
            f"the distillation term reaches none of the student's trainable parameters (taps "
            f"{distiller.student_layers}; trainable groups {_groups([n for n, _ in params])}): "
            "the tapped output is detached, the layers before it are frozen, or the method "
            "returns a value that does not depend on the student's features")
    still = [p for p in distiller.pairs if not s_trainable.get(p.name, True)]
    if still:
        raise ValueError(
            "the student's level(s) " + ", ".join(f"{p.name} (tap {p.student!r})" for p in still)
            + " depend on no trainable parameter (the layers before them are frozen or their "
            "output is detached): their terms would train only the method's adapters; tap "
            "trainable layers, unfreeze the ones before them (e.g. a larger "
            "trainable_backbone_layers), or leave these levels out (levels=[...])")
    norm = total_norm(g for g in grads if g is not None)
    if value == 0.0 or norm == 0.0:
        raise ValueError(f"the distillation term is {value:.4g} with a gradient norm of "
                         f"{norm:.4g} on the student's groups {_groups(reached)} on the first "
                         "batch: it would not move the student (a constant term, or a student "
                         "equal to its teacher?)")
    return {"term": value, "grad_norm": norm, "reached_groups": _groups(reached),
            "levels": [p.name for p in distiller.pairs], "unpaired_student_levels": s_unpaired}


def _levels(distiller: Distiller) -> str:
    return ", ".join(f"{k}: {float(v):.4g}" for k, v in distiller.method.level_values.items())
