"""Head-level methods against float64 NumPy references written from their papers
(``tests/golden/head_reference.py``), their gradients, and their behaviour at padding."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from head_helpers import LEVELS, context, np_, reference

from structkd.methods import build_method

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


def _np_levels(ctx, field: str) -> dict:
    return {n: np_(getattr(h, field)) for n, h in ctx.teacher_head.items()}


def _projectors(method) -> dict:
    out = {}
    for n, seq in method.projectors.items():
        out[n] = [(np_(seq[i].weight)[:, :, 0, 0], np_(seq[i].bias)) for i in (0, 2)]
    return out


# ------------------------------------------------------------------------- scoreweighted


@pytest.mark.parametrize("aux", [False, True], ids=["one-branch", "yolo26-two-branches"])
def test_scoreweighted_equals_the_reference(aux: bool) -> None:
    ctx = context(aux=aux)
    method = build_method("scoreweighted", LEVELS).double()
    out = method(ctx)
    assert set(out) == {"distill"}
    ref = reference().scoreweighted(
        {n: np_(v) for n, v in ctx.student.items()}, {n: np_(v) for n, v in ctx.teacher.items()},
        _np_levels(ctx, "logits"), _projectors(method), 6.0,
        _np_levels(ctx, "aux_logits") if aux else None)
    assert float(out["distill"]) == pytest.approx(ref, rel=1e-12)


def test_scoreweighted_equals_ultralytics_own_loss() -> None:
    """The same number as Ultralytics' ``DistillationModel.loss_sl2`` on the same projected
    maps and teacher scores (its own code, called as it calls it)."""
    pytest.importorskip("ultralytics")
    from ultralytics.nn.distill_model import DistillationModel

    ctx = context(aux=True)
    method = build_method("scoreweighted", LEVELS).double()
    ours = float(method(ctx)["distill"])
    names = list(ctx.teacher)
    scores = []
    for n in names:  # Ultralytics: mean of the two branches' logits, sigmoid, max over classes
        h = ctx.teacher_head[n]
        logits = ((h.logits + h.aux_logits) / 2).flatten(1, 2).flatten(2)  # (B, K, H*W)
        scores.append(logits.sigmoid().max(dim=1, keepdim=True).values)
    theirs = 0.0
    for i, n in enumerate(names):
        s = method.projectors[n](ctx.student[n])
        theirs += float(DistillationModel.loss_sl2(None, s, ctx.teacher[n], feat_idx=i,
                                                   teacher_scores=tuple(scores))) * 6.0
    assert ours == pytest.approx(theirs, rel=1e-10)


def test_scoreweighted_gradients_reach_the_student_and_its_projectors_only() -> None:
    ctx = context()
    method = build_method("scoreweighted", LEVELS).double()
    method(ctx)["distill"].backward()
    for n in ctx.student:
        assert ctx.student[n].grad is not None and ctx.student[n].grad.abs().sum() > 0
        assert ctx.student_head[n].logits.grad is None  # the student's head is not distilled
        assert ctx.teacher[n].grad is None
    assert all(p.grad is not None for p in method.parameters())

    def f(s8, s16):
        c = dataclasses.replace(ctx, student={"s8": s8, "s16": s16})
        return method(c)["distill"]

    s = [ctx.student[n].detach().clone().requires_grad_(True) for n in ("s8", "s16")]
    assert torch.autograd.gradcheck(f, s)


def test_scoreweighted_gives_padded_cells_no_weight() -> None:
    ctx = context()
    method = build_method("scoreweighted", LEVELS).double()
    padded = dataclasses.replace(ctx, batch_shape=(48, 56), image_sizes=[(48, 56), (24, 32)])
    before = float(method(padded)["distill"])
    changed = {n: v.detach().clone() for n, v in ctx.teacher.items()}
    for n, lv in {lv.name: lv for lv in LEVELS}.items():
        rows, cols = -(-24 // lv.stride), -(-32 // lv.stride)
        changed[n][1, :, rows:, :] += 100.0  # only padded cells of image 1 change
        changed[n][1, :, :, cols:] += 100.0
    after = float(method(dataclasses.replace(padded, teacher=changed))["distill"])
    assert after == pytest.approx(before, rel=1e-12)
    assert float(method(dataclasses.replace(ctx, teacher=changed))["distill"]) > before * 10


# ---------------------------------------------------------------------------------- BCKD


def _valid(ctx) -> dict | None:
    if ctx.image_sizes is None:
        return None
    return {n: ctx.valid_mask(n)[:, 0].numpy() for n in ctx.teacher}


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("options", [{}, {"beta": 2.0, "cls_weight": 0.5, "weight": 3.0}])
def test_bckd_equals_the_reference(padded: bool, options: dict) -> None:
    ctx = context(anchors=3)
    if padded:
        ctx = dataclasses.replace(ctx, image_sizes=[(48, 56), (20, 30)])
    method = build_method("bckd", LEVELS, **options).double()
    out = method(ctx)
    assert set(out) == {"distill/cls", "distill/loc"}
    s_head, t_head = ctx.student_head, ctx.teacher_head
    ref = reference().bckd({n: np_(h.logits) for n, h in s_head.items()},
                           {n: np_(h.logits) for n, h in t_head.items()},
                           {n: np_(h.ltrb) for n, h in s_head.items()},
                           {n: np_(h.ltrb) for n, h in t_head.items()}, valid=_valid(ctx),
                           **options)
    assert float(out["distill/cls"].detach()) == pytest.approx(ref["cls"], rel=1e-12)
    assert float(out["distill/loc"].detach()) == pytest.approx(ref["loc"], rel=1e-12)


def test_bckd_gradients_match_finite_differences_and_skip_the_teacher() -> None:
    """The classification term in the logits (its factor |p_t - p_s| keeps its gradient), the
    localisation term in the boxes (its weight max |p_t - p_s| is detached: no gradient to
    the logits), nothing to the teacher."""
    ctx = context()
    method = build_method("bckd", LEVELS).double()
    names = list(ctx.teacher)

    def term(key: str, field: str):
        def f(*xs):
            s_head = {n: dataclasses.replace(ctx.student_head[n], **{field: x})
                      for n, x in zip(names, xs, strict=True)}
            return method(dataclasses.replace(ctx, student_head=s_head))[key]
        xs = [getattr(ctx.student_head[n], field).detach().clone().requires_grad_(True)
              for n in names]
        return f, xs

    for key, field in (("distill/cls", "logits"), ("distill/loc", "ltrb")):
        f, xs = term(key, field)
        assert torch.autograd.gradcheck(f, xs), key
    out = method(ctx)
    grads = torch.autograd.grad(out["distill/loc"], [ctx.student_head[n].logits for n in names],
                                allow_unused=True)
    assert all(g is None or float(g.abs().sum()) == 0.0 for g in grads)
    (out["distill/cls"] + out["distill/loc"]).backward()
    assert all(h.logits.grad is None for h in ctx.teacher_head.values())
    assert all(h.logits.grad.abs().sum() > 0 for h in ctx.student_head.values())


def test_bckd_is_zero_when_the_student_predicts_what_the_teacher_does() -> None:
    ctx = context()
    same = {n: dataclasses.replace(h) for n, h in ctx.teacher_head.items()}
    out = build_method("bckd", LEVELS).double()(dataclasses.replace(ctx, student_head=same))
    assert float(out["distill/loc"]) == pytest.approx(0.0, abs=1e-12)
    # the classification term is the gap-weighted BCE: zero gap, zero loss
    assert float(out["distill/cls"]) == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------------------------ LD


def _boxes():
    return [torch.tensor([[4.0, 6.0, 40.0, 30.0], [30.0, 20.0, 55.0, 47.0]], dtype=torch.float64),
            torch.zeros(0, 4, dtype=torch.float64)]


def _ld_case(padded: bool, options: dict):
    """LD's context (two boxes on image 0, none on image 1; padded: image 0 smaller) and its
    terms with ``options``."""
    ctx = dataclasses.replace(context(bins=8), boxes=_boxes())
    if padded:
        ctx = dataclasses.replace(ctx, image_sizes=[(30, 40), (48, 56)])
    return ctx, build_method("ld", LEVELS, **options).double()(ctx)


@pytest.mark.parametrize("options", [{}, {"temperature": 2.0, "weight": 1.0}])
@pytest.mark.parametrize("padded", [False, True])
def test_ld_equals_the_reference(options: dict, padded: bool) -> None:
    ctx, out = _ld_case(padded, options)
    s_head, t_head = ctx.student_head, ctx.teacher_head
    ref = reference().ld({n: np_(h.distribution) for n, h in s_head.items()},
                         {n: np_(h.distribution) for n, h in t_head.items()},
                         {n: np_(h.logits) for n, h in s_head.items()},
                         [b.numpy() for b in ctx.boxes],
                         {n: h.stride for n, h in s_head.items()}, 0.5, valid=_valid(ctx),
                         **options)
    assert ref > 0
    assert float(out["distill/main"].detach()) == pytest.approx(ref, rel=1e-12)


def test_ld_gradients_reach_the_student_distributions_only() -> None:
    ctx = dataclasses.replace(context(bins=8), boxes=_boxes())
    method = build_method("ld", LEVELS).double()
    names = list(ctx.teacher)

    def f(*xs):
        s_head = {n: dataclasses.replace(ctx.student_head[n], distribution=x)
                  for n, x in zip(names, xs, strict=True)}
        out = method(dataclasses.replace(ctx, student_head=s_head))
        return out["distill/main"] + out["distill/vlr"]

    xs = [ctx.student_head[n].distribution.detach().clone().requires_grad_(True)
          for n in names]
    assert torch.autograd.gradcheck(f, xs)


def test_ld_needs_boxes_in_the_context() -> None:
    with pytest.raises(ValueError, match="needs ground-truth boxes"):
        build_method("ld", LEVELS).double()(context(bins=8))


# ------------------------------------------------------------------ several methods at once


def test_together_sums_its_parts_each_at_its_weight() -> None:
    """``Together`` of MGD (a feature method with its own generators) and BCKD: its terms are
    each part's own terms on the same context, times the part's weight and the overall one."""
    from structkd.methods.together import Together

    ctx = context()
    torch.manual_seed(0)
    mgd = build_method("mgd", LEVELS, weight=0.5, mask_ratio=0.0).double()
    bckd = build_method("bckd", LEVELS, loc_weight=2.0).double()
    expected_mgd = float(mgd(ctx)["distill"].detach())
    expected_bckd = {k: float(v.detach()) for k, v in bckd(ctx).items()}
    both = Together({"mgd": mgd, "bckd": bckd}, weight=3.0).double()
    assert both.part_weight("mgd") == 0.5 and both.part_weight("bckd") == 1.0
    out = {k: float(v.detach()) for k, v in both(ctx).items()}
    assert set(out) == {"distill/mgd", "distill/bckd/cls", "distill/bckd/loc"}
    assert out["distill/mgd"] == pytest.approx(3.0 * expected_mgd, rel=1e-12)
    for k in ("cls", "loc"):
        assert out[f"distill/bckd/{k}"] == pytest.approx(3.0 * expected_bckd[f"distill/{k}"],
                                                         rel=1e-12)
    assert set(both.level_values) == {f"{p}/{n}" for p in ("mgd", "bckd") for n in ("s8", "s16")}
    # the part weights are a buffer: checkpoints carry them
    assert "part_weights" in both.state_dict()
    both.set_part_weight("bckd", 0.0)
    assert set(both(ctx)) == {"distill/mgd"}


@pytest.mark.parametrize(("name", "options", "message"), [
    ("mgd+bckd", {"mask_ratio": 0.5}, "options of several methods are given per method"),
    ("mgd+bckd", {"bckd": {"beta": "x"}}, "beta"),
    ("mgd+", {}, "expected method names joined by '\\+'"),
    ("mgd+nosuch", {}, "'nosuch' is unknown"),
])
def test_several_methods_check_their_options_per_method(name, options, message) -> None:
    from structkd.methods import check_method

    with pytest.raises(ValueError, match=message):
        check_method(name, options)


# ------------------------------------------------------------------------------- CrossKD


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("options", [{}, {"beta": 2.0, "loc_weight": 3.0, "weight": 0.5}])
def test_crosskd_equals_the_reference(padded: bool, options: dict) -> None:
    """Its terms on given cross-head predictions (the context's ``cross_head``; how they are
    made is checked in tests/distill/test_crosskd.py)."""
    ctx = context(anchors=3)
    cross = context(seed=1, anchors=3).student_head
    ctx = dataclasses.replace(ctx, cross_head=cross)
    if padded:
        ctx = dataclasses.replace(ctx, image_sizes=[(48, 56), (20, 30)])
    method = build_method("crosskd", [dataclasses.replace(lv, student_channels=6)
                                      for lv in LEVELS], **options).double()
    out = method(ctx)
    ref = reference().crosskd({n: np_(h.logits) for n, h in cross.items()},
                              {n: np_(h.logits) for n, h in ctx.teacher_head.items()},
                              {n: np_(h.ltrb) for n, h in cross.items()},
                              {n: np_(h.ltrb) for n, h in ctx.teacher_head.items()},
                              valid=_valid(ctx), **options)
    assert float(out["distill/cls"].detach()) == pytest.approx(ref["cls"], rel=1e-12)
    assert float(out["distill/loc"].detach()) == pytest.approx(ref["loc"], rel=1e-12)
    out["distill/cls"].backward(retain_graph=True)
    assert all(h.logits.grad is not None for h in cross.values())
    assert all(h.logits.grad is None for h in ctx.student_head.values())  # its own head: none


# ------------------------------------------------------------------------------- detr_kd


def _queries(gen, layers: int, queries: int, grad: bool = False):
    from structkd.methods import QueryLayer

    out = []
    for _ in range(layers):
        logits = (torch.randn(2, queries, 3, generator=gen, dtype=torch.float64) * 2)
        centre = torch.rand(2, queries, 2, generator=gen, dtype=torch.float64) * 0.6 + 0.2
        size = torch.rand(2, queries, 2, generator=gen, dtype=torch.float64) * 0.4 + 0.05
        boxes = torch.cat([centre, size], dim=-1)
        out.append(QueryLayer(logits.requires_grad_(grad), boxes.requires_grad_(grad)))
    return out


@pytest.mark.parametrize(("layers", "queries", "options"), [
    ((3, 3), (4, 4), {}),
    ((2, 4), (5, 4), {"l1_weight": 1.0, "weight": 2.0}),  # a student query left unmatched
    ((3, 2), (4, 4), {"giou_weight": 0.5}),
])
def test_detr_kd_equals_the_brute_force_reference(layers, queries, options) -> None:
    gen = torch.Generator().manual_seed(0)
    s = _queries(gen, layers[0], queries[0], grad=True)
    t = _queries(gen, layers[1], queries[1])
    ctx = dataclasses.replace(context(), student_queries=s, teacher_queries=t)
    method = build_method("detr_kd", LEVELS, **options).double()
    out = method(ctx)
    assert set(out) == {"distill/cls", "distill/l1", "distill/giou"}
    ref = reference().detr_kd([(np_(q.logits), np_(q.boxes)) for q in s],
                              [(np_(q.logits), np_(q.boxes)) for q in t], **options)
    for k in ("cls", "l1", "giou"):
        assert float(out[f"distill/{k}"].detach()) == pytest.approx(ref[k], rel=1e-10), k
    sum(out.values()).backward()
    assert all(q.logits.grad is not None and q.boxes.grad is not None for q in s)
    assert set(method.level_values) == {f"layer{i}" for i in range(layers[0])}


def test_detr_kd_of_a_student_equal_to_its_teacher_leaves_only_the_entropy() -> None:
    """Matched to itself: no box loss, and the class term is the teacher scores' own entropy
    (the minimum of the BCE against soft targets)."""
    gen = torch.Generator().manual_seed(1)
    t = _queries(gen, 2, 4)
    ctx = dataclasses.replace(context(), student_queries=t, teacher_queries=t)
    out = build_method("detr_kd", LEVELS).double()(ctx)
    assert float(out["distill/l1"]) == pytest.approx(0.0, abs=1e-12)
    assert float(out["distill/giou"]) == pytest.approx(0.0, abs=1e-6)
    p = torch.stack([q.logits for q in t]).sigmoid()
    entropy = -(p * p.log() + (1 - p) * (1 - p).log()).sum() / (2 * 4)  # N = 8 pairs a layer
    assert float(out["distill/cls"]) == pytest.approx(float(entropy), rel=1e-9)


@pytest.mark.parametrize("options", [{}, {"gamma": 0.0, "topk": 4, "vlr_weight": 2.0},
                                     {"anchor_scale": 4.0}])
@pytest.mark.parametrize("padded", [False, True])
def test_ld_valuable_localization_region_equals_the_reference(options: dict,
                                                              padded: bool) -> None:
    ctx, out = _ld_case(padded, options)
    s_head, t_head = ctx.student_head, ctx.teacher_head
    ref = reference().ld_vlr({n: np_(h.distribution) for n, h in s_head.items()},
                             {n: np_(h.distribution) for n, h in t_head.items()},
                             [b.numpy() for b in ctx.boxes],
                             {n: h.stride for n, h in s_head.items()}, 0.5, valid=_valid(ctx),
                             weight=0.25 * options.get("vlr_weight", 1.0),
                             **{k: v for k, v in options.items() if k != "vlr_weight"})
    assert ref > 0
    assert float(out["distill/vlr"].detach()) == pytest.approx(ref, rel=1e-10)


def test_ld_without_the_valuable_region_has_the_main_term_only() -> None:
    ctx = dataclasses.replace(context(bins=8), boxes=_boxes())
    out = build_method("ld", LEVELS, vlr_weight=0.0).double()(ctx)
    assert set(out) == {"distill/main"}


def test_crosskd_and_detr_kd_gradients_match_finite_differences() -> None:
    ctx = dataclasses.replace(context(), cross_head=context(seed=1).student_head)
    crosskd = build_method("crosskd", [dataclasses.replace(lv, student_channels=6)
                                       for lv in LEVELS]).double()
    names = list(ctx.teacher)

    def cross(*xs):
        heads = {n: dataclasses.replace(ctx.cross_head[n], logits=xs[2 * i],
                                        ltrb=xs[2 * i + 1]) for i, n in enumerate(names)}
        out = crosskd(dataclasses.replace(ctx, cross_head=heads))
        return out["distill/cls"] + out["distill/loc"]

    xs = [t.detach().clone().requires_grad_(True) for n in names
          for t in (ctx.cross_head[n].logits, ctx.cross_head[n].ltrb)]
    assert torch.autograd.gradcheck(cross, xs)

    from structkd.methods import QueryLayer

    gen = torch.Generator().manual_seed(3)
    s, t = _queries(gen, 2, 4), _queries(gen, 2, 4)
    detr = build_method("detr_kd", LEVELS).double()

    def queries(*xs):
        layers = [QueryLayer(xs[2 * i], xs[2 * i + 1]) for i in range(2)]
        out = detr(dataclasses.replace(ctx, student_queries=layers, teacher_queries=t))
        return sum(out.values())

    xs = [x.detach().clone().requires_grad_(True) for q in s for x in (q.logits, q.boxes)]
    assert torch.autograd.gradcheck(queries, xs)  # the matching is fixed near these points
