"""Float64 NumPy references of the head-level distillation methods, written from their papers
(and, for ``scoreweighted``, from Ultralytics' description of its loss). Never imports structkd
or torch: inputs are NumPy arrays in the layouts documented per function.

Layouts: features (B, C, H, W); class logits (B, A, K, H, W); edge distances ltrb (B, A, 4, H, W)
in pixels from each location's centre; distributions (B, A, 4, R, H, W) logits over R bins.
"""

from __future__ import annotations

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def conv1x1(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(B, Cin, H, W) -> (B, Cout, H, W) with weight (Cout, Cin) and bias (Cout,)."""
    return np.einsum("oc,bchw->bohw", w, x) + b[None, :, None, None]


def scoreweighted(student: dict, teacher: dict, t_logits: dict, projectors: dict,
                  weight: float, t_aux: dict | None = None) -> float:
    """Ultralytics' distill_model loss: per level, student -> conv1x1 -> ReLU -> conv1x1, then
    sum(w (P(S) - T)^2) / (C sum(w) + 1e-9) with w = max over anchors and classes of
    sigmoid(logits) (of the mean of both branches' logits when ``t_aux`` is given); the levels'
    sum times ``weight``."""
    total = 0.0
    for name, s in student.items():
        (w1, b1), (w2, b2) = projectors[name]
        p = conv1x1(np.maximum(conv1x1(s, w1, b1), 0.0), w2, b2)
        t = teacher[name]
        logits = t_logits[name] if t_aux is None else (t_logits[name] + t_aux[name]) / 2
        w = sigmoid(logits).max(axis=(1, 2))[:, None]
        total += float(((p - t) ** 2 * w).sum() / (w.sum() * t.shape[1] + 1e-9))
    return weight * total


def _log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    """Numerically stable log-softmax along ``axis``."""
    m = x.max(axis=axis, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def _bce_with_logits(s: np.ndarray, y: np.ndarray) -> np.ndarray:
    """BCE(sigmoid(s); target y) = -(y log p + (1 - y) log(1 - p)), computed stably from the
    logit as max(s, 0) - s y + log(1 + exp(-|s|))."""
    return np.maximum(s, 0.0) - s * y + np.log1p(np.exp(-np.abs(s)))


def _giou_from_ltrb(ls: np.ndarray, lt: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """GIoU of two boxes around the same centre, given as edge distances (..., 4) = (l, t, r, b);
    each box is (x1, y1, x2, y2) = (-l, -t, r, b) (the common centre cancels).
    GIoU = IoU - (|C| - |U|) / (|C| + eps) with IoU = (inter + eps) / (|U| + eps) (two equal
    boxes of no area agree fully), U the union and C the
    smallest enclosing box. Returns the shape of ``ls[..., 0]``."""
    sx1, sy1, sx2, sy2 = -ls[..., 0], -ls[..., 1], ls[..., 2], ls[..., 3]
    tx1, ty1, tx2, ty2 = -lt[..., 0], -lt[..., 1], lt[..., 2], lt[..., 3]
    area_s = (sx2 - sx1) * (sy2 - sy1)
    area_t = (tx2 - tx1) * (ty2 - ty1)
    iw = np.maximum(np.minimum(sx2, tx2) - np.maximum(sx1, tx1), 0.0)
    ih = np.maximum(np.minimum(sy2, ty2) - np.maximum(sy1, ty1), 0.0)
    inter = iw * ih
    union = area_s + area_t - inter
    iou = (inter + eps) / (union + eps)
    cw = np.maximum(sx2, tx2) - np.minimum(sx1, tx1)
    ch = np.maximum(sy2, ty2) - np.minimum(sy1, ty1)
    c_area = cw * ch
    return iou - (c_area - union) / (c_area + eps)


def _valid_or_ones(valid: dict | None, name: str, b: int, h: int, w: int) -> np.ndarray:
    """The (B, H, W) validity mask of level ``name`` as bools (all True when not given)."""
    if valid is None or valid.get(name) is None:
        return np.ones((b, h, w), dtype=bool)
    v = np.asarray(valid[name])
    assert v.shape == (b, h, w), (v.shape, (b, h, w))
    return v > 0.5


def bckd(s_logits: dict, t_logits: dict, s_ltrb: dict, t_ltrb: dict, valid: dict | None = None,
         cls_weight: float = 1.0, loc_weight: float = 4.0, beta: float = 1.0,
         weight: float = 1.0) -> dict:
    """Bridging Cross-task protocol inconsistency KD (BCKD, Yang et al., ICCV 2023).

    Logits (B, A, K, H, W), ltrb (B, A, 4, H, W). Per location-anchor a and class c, with
    p_s = sigmoid(s), p_t = sigmoid(t):
      l_cls(a) = sum_c |p_t - p_s|^beta * BCE(p_s; target p_t),
      u(a) = max_c |p_t - p_s|,  l_loc(a) = u(a) * (1 - GIoU(box_s, box_t)), boxes (-l, -t, r, b).
    Only valid cells count (all anchors of a valid cell; ``valid[name]`` (B, H, W), None: all).
    N = max(sum over valid cells, levels, images, anchors of max_c p_t, 1).
    Returns {"cls": weight * cls_weight * sum l_cls / N,
             "loc": weight * loc_weight * sum l_loc / N}.
    """
    sum_cls = 0.0
    sum_loc = 0.0
    norm = 0.0
    for name in s_logits:
        s = np.asarray(s_logits[name], dtype=np.float64)
        t = np.asarray(t_logits[name], dtype=np.float64)
        sl = np.asarray(s_ltrb[name], dtype=np.float64)
        tl = np.asarray(t_ltrb[name], dtype=np.float64)
        nb, na, _, h, w = s.shape
        v = _valid_or_ones(valid, name, nb, h, w)
        p_s, p_t = sigmoid(s), sigmoid(t)
        diff = np.abs(p_t - p_s)                                    # (B, A, K, H, W)
        l_cls = (diff ** beta * _bce_with_logits(s, p_t)).sum(axis=2)  # (B, A, H, W)
        u = diff.max(axis=2)                                        # (B, A, H, W)
        giou = _giou_from_ltrb(np.moveaxis(sl, 2, -1), np.moveaxis(tl, 2, -1))  # (B, A, H, W)
        l_loc = u * (1.0 - giou)
        score_t = p_t.max(axis=2)                                   # (B, A, H, W)
        for b in range(nb):
            for i in range(h):
                for j in range(w):
                    if not v[b, i, j]:
                        continue
                    for a in range(na):
                        sum_cls += float(l_cls[b, a, i, j])
                        sum_loc += float(l_loc[b, a, i, j])
                        norm += float(score_t[b, a, i, j])
    n = max(norm, 1.0)
    return {"cls": weight * cls_weight * sum_cls / n, "loc": weight * loc_weight * sum_loc / n}


def _edge_kl(sd: np.ndarray, td: np.ndarray, T: float) -> np.ndarray:
    """T^2 * (1/R) * KL(softmax(td / T) || softmax(sd / T)) over the R bins (axis 3) of
    (B, A, 4, R, H, W) logits: (B, A, 4, H, W)."""
    log_qs = _log_softmax(sd / T, axis=3)
    log_qt = _log_softmax(td / T, axis=3)
    return T * T * (np.exp(log_qt) * (log_qt - log_qs)).sum(axis=3) / sd.shape[3]


def ld(s_dist: dict, t_dist: dict, s_logits: dict, boxes: list, stride: dict, offset: float,
       valid: dict | None = None, temperature: float = 10.0, weight: float = 0.25) -> float:
    """Localization Distillation (Zheng et al., CVPR 2022), main distillation region only.

    Distributions (B, A, 4, R, H, W), logits (B, A, K, H, W); ``boxes`` one (n_i, 4) array of
    x1, y1, x2, y2 (pixels) per image; cell (i, j) of level ``name`` has centre
    x = (j + offset) * stride[name], y = (i + offset) * stride[name].
      M: valid cells whose centre lies strictly inside some box of its image
         (x1 < x < x2 and y1 < y < y2); every anchor of such a cell.
      ld(a, e) = T^2 * (1/R) * sum_k q_t[k] (log q_t[k] - log q_s[k]),
         q = softmax over the R bins of dist / T (logs via log-softmax).
      w(a) = max_c sigmoid(s_logits) (a pure weight).
    Returns weight * sum_levels sum_{a in M} w(a) * (1/4) sum_e ld(a, e) / B.
    """
    T = float(temperature)
    total = 0.0
    nb = None
    for name in s_dist:
        sd = np.asarray(s_dist[name], dtype=np.float64)
        td = np.asarray(t_dist[name], dtype=np.float64)
        sc = np.asarray(s_logits[name], dtype=np.float64)
        nb, na, ne, _, h, w = sd.shape
        v = _valid_or_ones(valid, name, nb, h, w)
        kl = _edge_kl(sd, td, T)                                     # (B, A, 4, H, W)
        score = sigmoid(sc).max(axis=2)                              # (B, A, H, W)
        st = stride[name]
        for b in range(nb):
            bx = np.asarray(boxes[b], dtype=np.float64).reshape(-1, 4)
            for i in range(h):
                y = (i + offset) * st
                for j in range(w):
                    if not v[b, i, j]:
                        continue
                    x = (j + offset) * st
                    inside = any(x1 < x < x2 and y1 < y < y2 for x1, y1, x2, y2 in bx)
                    if not inside:
                        continue
                    for a in range(na):
                        edge_sum = sum(float(kl[b, a, e, i, j]) for e in range(ne))
                        total += float(score[b, a, i, j]) * edge_sum / 4.0
    if nb is None:
        return 0.0
    return weight * total / nb


def _iou_corners_plain(a, b) -> float:
    """Plain IoU of two corner boxes (x1, y1, x2, y2); 0 when the union is 0."""
    area_a = max(a[2] - a[0], 0.0) * max(a[3] - a[1], 0.0)
    area_b = max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def _diou_corners(a, b) -> float:
    """DIoU = IoU - rho^2 / c^2: rho the distance between the boxes' centres, c the diagonal of
    the smallest box enclosing both (the penalty is 0 when c is 0)."""
    rho2 = (((a[0] + a[2]) / 2 - (b[0] + b[2]) / 2) ** 2
            + ((a[1] + a[3]) / 2 - (b[1] + b[3]) / 2) ** 2)
    c2 = (max(a[2], b[2]) - min(a[0], b[0])) ** 2 + (max(a[3], b[3]) - min(a[1], b[1])) ** 2
    return _iou_corners_plain(a, b) - (rho2 / c2 if c2 > 0 else 0.0)


def ld_vlr(s_dist: dict, t_dist: dict, boxes: list, stride: dict, offset: float,
           valid: dict | None = None, temperature: float = 10.0, weight: float = 0.25,
           gamma: float = 0.25, anchor_scale: float = 8.0, topk: int = 9) -> float:
    """Localization Distillation (Zheng et al., CVPR 2022), valuable localization region (VLR).

    Distributions (B, A, 4, R, H, W) logits over R bins per edge; ``boxes`` one (n_i, 4) array of
    x1, y1, x2, y2 (pixels) per image (may have zero rows); cell (i, j) of level ``name`` (the
    dict's keys, in order) has centre x = (j + offset) * stride[name], y = (i + offset) *
    stride[name]; ``valid[name]`` optional (B, H, W), valid where > 0.5 (None / missing: all).
      Anchor: every location has a virtual square anchor of side anchor_scale * stride[name]
         centred at its centre (shared by the A anchors of the location).
      t_g (per image, per box g): candidates = on each level the ``topk`` cells (all cells when
         the level has fewer; valid or not) whose centres are nearest g's centre
         ((x1 + x2) / 2, (y1 + y2) / 2) by Euclidean distance, ties to the lower flat index
         i * W + j; t_g = mean + std (ddof=1) of IoU(anchor, g) over all candidates of all
         levels (std taken as 0 when there is a single candidate).
      IoU plain (0 when the union is 0); DIoU = IoU - rho^2 / c^2 (rho: distance between the
         centres; c: diagonal of the smallest enclosing box).
      M: cells whose centre lies strictly inside some box of its image (x1 < x < x2, y1 < y < y2).
      VLR: valid cells not in M with gamma * t_g <= DIoU(anchor, g) < t_g for some g of the
         image; v(a) = IoU(anchor, g*), g* the qualifying box of largest IoU (= the largest IoU
         over qualifying boxes). Every other cell has weight 0.
      ld(a, e) = T^2 * (1/R) * sum_r q_t[r] (log q_t[r] - log q_s[r]),
         q = softmax over the R bins of dist / T (logs via log-softmax), T = temperature.
    Returns weight * sum_levels sum_b sum_{a in VLR} sum_anchors v(a) * (1/16) sum_e ld(a, e) / B.
    """
    T = float(temperature)
    names = list(s_dist)
    if not names:
        return 0.0
    shapes = {}
    for name in names:
        nb, na, ne, _, h, w = np.asarray(s_dist[name]).shape
        shapes[name] = (h, w)
    nb = np.asarray(s_dist[names[0]]).shape[0]

    def centre(name: str, i: int, j: int) -> tuple:
        st = stride[name]
        return (j + offset) * st, (i + offset) * st

    def anchor(name: str, i: int, j: int) -> tuple:
        x, y = centre(name, i, j)
        half = anchor_scale * stride[name] / 2.0
        return (x - half, y - half, x + half, y + half)

    # Thresholds t_g per image and box.
    thresholds = []
    for b in range(nb):
        bx = np.asarray(boxes[b], dtype=np.float64).reshape(-1, 4)
        t_img = []
        for g in bx:
            gx, gy = (g[0] + g[2]) / 2.0, (g[1] + g[3]) / 2.0
            ious = []
            for name in names:
                h, w = shapes[name]
                cells = []
                for i in range(h):
                    for j in range(w):
                        x, y = centre(name, i, j)
                        d = float(np.sqrt((x - gx) ** 2 + (y - gy) ** 2))
                        cells.append((d, i * w + j, i, j))
                cells.sort(key=lambda c: (c[0], c[1]))
                for _, _, i, j in cells[:topk]:
                    ious.append(_iou_corners_plain(anchor(name, i, j), g))
            ious = np.asarray(ious, dtype=np.float64)
            std = float(ious.std(ddof=1)) if len(ious) > 1 else 0.0
            t_img.append(float(ious.mean()) + std if len(ious) else float("inf"))
        thresholds.append(t_img)

    total = 0.0
    for name in names:
        sd = np.asarray(s_dist[name], dtype=np.float64)
        td = np.asarray(t_dist[name], dtype=np.float64)
        _, na, ne, _, h, w = sd.shape
        v = _valid_or_ones(valid, name, nb, h, w)
        kl = _edge_kl(sd, td, T)                                     # (B, A, 4, H, W)
        for b in range(nb):
            bx = np.asarray(boxes[b], dtype=np.float64).reshape(-1, 4)
            for i in range(h):
                for j in range(w):
                    if not v[b, i, j]:
                        continue
                    x, y = centre(name, i, j)
                    if any(x1 < x < x2 and y1 < y < y2 for x1, y1, x2, y2 in bx):
                        continue
                    an = anchor(name, i, j)
                    best = None
                    for k, g in enumerate(bx):
                        t_g = thresholds[b][k]
                        if gamma * t_g <= _diou_corners(an, g) < t_g:
                            iou = _iou_corners_plain(an, g)
                            if best is None or iou > best:
                                best = iou
                    if best is None:
                        continue
                    for a in range(na):
                        edge_sum = sum(float(kl[b, a, e, i, j]) for e in range(ne))
                        total += best * edge_sum / 16.0
    return weight * total / nb


def crosskd(c_logits: dict, t_logits: dict, c_ltrb: dict, t_ltrb: dict,
            valid: dict | None = None, cls_weight: float = 1.0, loc_weight: float = 1.0,
            beta: float = 1.0, weight: float = 1.0) -> dict:
    """CrossKD's terms on the cross-head predictions c (the teacher's head layers run on the
    student's head features) against the teacher's t, per valid location-anchor a:
      l_cls(a) = sum_k |p_t - p_c|^beta * BCE(p_c; p_t),
      l_loc(a) = w(a) * (1 - GIoU(box_c, box_t)),  w(a) = max_k p_t,
      N = max(1, sum over valid a of w(a));
    returns {"cls": weight * cls_weight * sum l_cls / N,
             "loc": weight * loc_weight * sum l_loc / N}.
    """
    sums = {"cls": 0.0, "loc": 0.0}
    norm = 0.0
    for name in c_logits:
        c = np.asarray(c_logits[name], dtype=np.float64)
        t = np.asarray(t_logits[name], dtype=np.float64)
        nb, na, _, h, w = c.shape
        v = _valid_or_ones(valid, name, nb, h, w)
        for b in range(nb):
            for a in range(na):
                for i in range(h):
                    for j in range(w):
                        if not v[b, i, j]:
                            continue
                        pc, pt = sigmoid(c[b, a, :, i, j]), sigmoid(t[b, a, :, i, j])
                        bce = _bce_with_logits(c[b, a, :, i, j], pt)
                        sums["cls"] += float((np.abs(pt - pc) ** beta * bce).sum())
                        g = _giou_from_ltrb(np.asarray(c_ltrb[name])[b, a, :, i, j],
                                            np.asarray(t_ltrb[name])[b, a, :, i, j])
                        sums["loc"] += float(pt.max() * (1.0 - g))
                        norm += float(pt.max())
    n = max(norm, 1.0)
    return {"cls": weight * cls_weight * sums["cls"] / n,
            "loc": weight * loc_weight * sums["loc"] / n}


def _corners(b: np.ndarray) -> np.ndarray:
    cx, cy, w, h = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def _giou_corners(a: np.ndarray, b: np.ndarray, eps: float = 1e-7) -> float:
    """GIoU of two corner boxes; IoU = (inter + eps) / (union + eps)."""
    area_a = max(a[2] - a[0], 0.0) * max(a[3] - a[1], 0.0)
    area_b = max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = area_a + area_b - inter
    cw = max(max(a[2], b[2]) - min(a[0], b[0]), 0.0)
    ch = max(max(a[3], b[3]) - min(a[1], b[1]), 0.0)
    return (inter + eps) / (union + eps) - (cw * ch - union) / (cw * ch + eps)


def detr_kd(s_layers: list, t_layers: list, cls_weight: float = 1.0, l1_weight: float = 5.0,
            giou_weight: float = 2.0, weight: float = 1.0) -> dict:
    """DETRDistill's Hungarian-matching logits distillation. ``s_layers`` / ``t_layers``: per
    decoder layer (logits (B, Q, K), boxes (B, Q, 4) cx, cy, w, h). Student layer i pairs with
    teacher layer round((i + 1) * Lt / Ls) - 1. Per image, the matching minimises, by brute
    force over every assignment of the teacher's queries to distinct student queries,
    sum of cost_ij = cls_weight * sum_k BCE(s_ik; sigmoid(t_jk)) + l1_weight * |b_i - b_j|_1
    - giou_weight * GIoU(corners). Per layer, N = matched pairs in the batch:
    cls = cls_weight * sum over all student queries and classes of BCE(s; y) / N (y: the
    matched teacher scores, 0 for unmatched), l1 = l1_weight * sum |b_i - b_j|_1 / N,
    giou = giou_weight * sum (1 - GIoU) / N; summed over layers, times weight."""
    from itertools import permutations

    out = {"cls": 0.0, "l1": 0.0, "giou": 0.0}
    ls, lt = len(s_layers), len(t_layers)
    for i in range(ls):
        j = max(0, round((i + 1) * lt / ls) - 1)
        s_logits, s_boxes = (np.asarray(x, dtype=np.float64) for x in s_layers[i])
        t_logits, t_boxes = (np.asarray(x, dtype=np.float64) for x in t_layers[j])
        y_all = sigmoid(t_logits)
        nb, qs, _ = s_logits.shape
        qt = t_logits.shape[1]
        sums = {"cls": 0.0, "l1": 0.0, "giou": 0.0}
        matched = 0
        for b in range(nb):
            table = np.zeros((qs, qt))
            for si in range(qs):
                for tj in range(qt):
                    bce = _bce_with_logits(s_logits[b, si], y_all[b, tj]).sum()
                    l1 = np.abs(s_boxes[b, si] - t_boxes[b, tj]).sum()
                    g = _giou_corners(_corners(s_boxes[b, si]), _corners(t_boxes[b, tj]))
                    table[si, tj] = cls_weight * bce + l1_weight * l1 - giou_weight * g
            best = min(permutations(range(qs), qt),
                       key=lambda p: sum(table[p[tj], tj] for tj in range(qt)))
            target = np.zeros_like(s_logits[b])
            for tj, si in enumerate(best):
                target[si] = y_all[b, tj]
                sums["l1"] += float(np.abs(s_boxes[b, si] - t_boxes[b, tj]).sum())
                sums["giou"] += 1.0 - _giou_corners(_corners(s_boxes[b, si]),
                                                    _corners(t_boxes[b, tj]))
                matched += 1
            sums["cls"] += float(_bce_with_logits(s_logits[b], target).sum())
        n = max(matched, 1)
        out["cls"] += weight * cls_weight * sums["cls"] / n
        out["l1"] += weight * l1_weight * sums["l1"] / n
        out["giou"] += weight * giou_weight * sums["giou"] / n
    return out
