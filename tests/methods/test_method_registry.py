"""The method registry (``structkd.methods.registry``): unknown names and options, bad values,
the authors' presets, ``method_info`` and a user-registered method."""

from __future__ import annotations

import pytest
from method_helpers import ALL, small_context
from torch import Tensor

from structkd.methods import (
    ALIASES,
    METHODS,
    DistillContext,
    DistillMethod,
    Level,
    build_method,
    describe_methods,
    method_info,
    register_method,
)
from structkd.methods.base import check_positive

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


# --------------------------------------------------------------------------- registry


LV = [Level("p3", 8, 4, 4), Level("p4", 16, 4, 4)]


def test_unknown_method_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"method='nope' is unknown; expected one of") as err:
        build_method("nope", LV)
    for name in ("imitation", "pkd", "cwd", "mgd", "fgd", "ssim", "l1", "mse"):
        assert f"'{name}'" in str(err.value)


@pytest.mark.parametrize(("name", "valid"), [
    ("cwd", "['adapter', 'tau', 'weight']"),
    ("pkd", "['adapter', 'preset', 'weight']"),
    ("mgd", "['adapter', 'mask_ratio', 'preset', 'weight']"),
    ("fgd", "['adapter', 'alpha', 'beta', 'gamma', 'lambda_', 'preset', 'temperature', "
            "'weight']"),
])
def test_unknown_option_lists_valid_ones(name, valid) -> None:
    with pytest.raises(ValueError, match=r"option\(s\) \['temp'\] are not accepted by method "
                       rf"'{name}'; expected some of") as err:
        build_method(name, LV, temp=0.5)
    assert valid in str(err.value)


@pytest.mark.parametrize(("name", "options", "message"), [
    ("mgd", {"mask_ratio": "half"}, "mask_ratio='half'; expected float or null (method 'mgd')"),
    ("cwd", {"tau": True}, "tau=True; expected float (method 'cwd')"),
    ("pkd", {"preset": 3}, "preset=3; expected str (method 'pkd')"),
    ("ssim", {"window_size": 7.5}, "window_size=7.5; expected int (distance 'ssim')"),
    ("ssim", {"window_size": True}, "window_size=True; expected int (distance 'ssim')"),
    ("ssim", {"sigma": "wide"}, "sigma='wide'; expected float (distance 'ssim')"),
])
def test_an_option_of_another_type_names_its_annotation(name, options, message) -> None:
    with pytest.raises(ValueError) as err:
        build_method(name, LV, **options)
    assert str(err.value) == message


def test_an_int_is_a_float_option_and_the_types_need_no_build() -> None:
    assert build_method("cwd", LV, tau=2).tau == 2  # YAML's 2 for a float option
    assert build_method("ssim", LV, sigma=2, window_size=7) is not None


def test_unknown_imitation_option_lists_distance_options() -> None:
    with pytest.raises(ValueError, match=r"option\(s\) \['tau'\] are not accepted by "
                       r"(method|distance) 'ssim'; expected some of \[.*'window_size'"):
        build_method("ssim", LV, tau=1.0)
    with pytest.raises(ValueError, match=r"distance='foo' is not supported"):
        build_method("imitation", LV, distance="foo")
    with pytest.raises(ValueError, match=r"method 'ssim' fixes .*contradict"):
        build_method("ssim", LV, distance="l1")


NAN, INF = float("nan"), float("inf")
BAD = [
    ("pkd", {"weight": -1.0}, r"weight=-1\.0 is invalid"),
    ("cwd", {"weight": -2}, r"weight=-2 is invalid"),
    ("ssim", {"weight": -0.5}, r"weight=-0\.5 is invalid"),
    ("fgd", {"weight": INF}, r"weight=inf is invalid"),
    ("pkd", {"weight": True}, r"weight=True; expected float or null \(method 'pkd'\)"),
    ("cwd", {"tau": 0}, r"tau=0 is invalid; expected a finite number > 0"),
    ("cwd", {"tau": NAN}, r"tau=nan is invalid"),
    ("cwd", {"weight": NAN}, r"weight=nan is invalid"),
    ("mgd", {"mask_ratio": 1}, r"mask_ratio=1(\.0)? is invalid; expected \[0, 1\)"),
    ("mgd", {"mask_ratio": 1.5}, r"mask_ratio=1\.5 is invalid"),
    ("mgd", {"mask_ratio": -0.1}, r"mask_ratio=-0\.1 is invalid"),
    ("mgd", {"mask_ratio": NAN}, r"mask_ratio=nan is invalid"),
    ("mgd", {"weight": NAN}, r"weight=nan is invalid"),
    ("fgd", {"temperature": 0}, r"temperature=0 is invalid"),
    ("fgd", {"alpha": -1e-3}, r"alpha=-0\.001 is invalid"),
    ("fgd", {"beta": NAN}, r"beta=nan is invalid"),
    ("fgd", {"gamma": -1}, r"gamma=-1 is invalid"),
    ("fgd", {"lambda_": NAN}, r"lambda_=nan is invalid"),
    ("pkd", {"preset": "yolo"},
     r"preset='yolo' is not supported; expected one of \['retinanet', 'fasterrcnn'\]"),
    ("mgd", {"preset": "fcos"}, r"preset='fcos' is not supported"),
    ("fgd", {"preset": "ssd"},
     r"preset='ssd' is not supported; expected one of \['retinanet', 'fasterrcnn', 'fcos'\]"),
    *[(m, {"adapter": "foo"}, r"adapter='foo' is not supported") for m in ALL],
]


@pytest.mark.parametrize(("name", "options", "message"), BAD,
                         ids=[f"{n}-{next(iter(o))}={next(iter(o.values()))}"
                              for n, o, _ in BAD])
def test_bad_option_values(name, options, message) -> None:
    with pytest.raises(ValueError, match=message):
        build_method(name, LV, **options)


def test_bad_levels_and_context() -> None:
    with pytest.raises(ValueError, match="levels is empty"):
        build_method("cwd", [])
    with pytest.raises(ValueError, match="not unique"):
        build_method("cwd", [LV[0], LV[0]])
    with pytest.raises(ValueError, match="equal channels"):
        build_method("cwd", [Level("a", 8, 3, 4)], adapter="identity")
    ctx, levels = small_context()
    ctx.boxes = None
    with pytest.raises(ValueError, match="needs ground-truth boxes"):
        build_method("fgd", levels)(ctx)
    with pytest.raises(ValueError, match=r"levels \['z'\] are missing"):
        build_method("cwd", [*levels, Level("z", 64, 3, 4)])(ctx)


# Authors' values: MMRazor configs/distill/mmdet/pkd (loss_weight 10 RetinaNet, 6 Faster R-CNN),
# MMRazor configs/distill/mmdet/cwd (tau 1, loss_weight 10), yzd-v/MGD det/configs/distillers/mgd
# (alpha_mgd 2e-5 / lambda_mgd 0.65 RetinaNet, 5e-7 / 0.45 Faster R-CNN), yzd-v/FGD
# configs/distillers/fgd (temp, alpha_fgd, beta_fgd, gamma_fgd, lambda_fgd).
PRESETS = [
    ("pkd", {}, {"weight": 10.0}),
    ("pkd", {"preset": "retinanet"}, {"weight": 10.0}),
    ("pkd", {"preset": "fasterrcnn"}, {"weight": 6.0}),
    ("pkd", {"preset": "fasterrcnn", "weight": 2.0}, {"weight": 2.0}),
    ("cwd", {}, {"weight": 10.0, "tau": 1.0}),
    ("mgd", {}, {"weight": 2e-5, "mask_ratio": 0.65}),
    ("mgd", {"preset": "fasterrcnn"}, {"weight": 5e-7, "mask_ratio": 0.45}),
    ("mgd", {"preset": "fasterrcnn", "mask_ratio": 0.3}, {"weight": 5e-7, "mask_ratio": 0.3}),
    ("fgd", {}, {"temperature": 0.5, "term_weights": {"fg": 1e-3, "bg": 5e-4,
                                                      "attention": 5e-4, "global": 5e-6}}),
    ("fgd", {"preset": "fasterrcnn"}, {"temperature": 0.5, "term_weights": {
        "fg": 5e-5, "bg": 2.5e-5, "attention": 5e-5, "global": 5e-7}}),
    ("fgd", {"preset": "fcos"}, {"temperature": 0.8, "term_weights": {
        "fg": 1.6e-3, "bg": 8e-4, "attention": 8e-4, "global": 8e-6}}),
    ("fgd", {"preset": "fcos", "gamma": 0.0, "weight": 2.0}, {"temperature": 0.8, "weight": 2.0,
     "term_weights": {"fg": 1.6e-3, "bg": 8e-4, "attention": 0.0, "global": 8e-6}}),
]


@pytest.mark.parametrize(("name", "options", "expected"), PRESETS)
def test_presets_are_the_authors_values(name, options, expected) -> None:
    method = build_method(name, LV, **options)
    for attr, value in expected.items():
        assert getattr(method, attr) == value, attr
    if name == "fgd":
        assert method.weight == expected.get("weight", 1.0)


def test_method_info_lists_options_and_aliases() -> None:
    names = [info.name for info in describe_methods()]
    assert names[:5] == ["imitation", "cwd", "fgd", "mgd", "pkd"]
    info = method_info("ssim")
    assert info.name == "imitation" and set(info.aliases) >= {"ssim", "l1", "mse", "l2"}
    assert "window_size" in info.extra_options["ssim"]
    fgd = method_info("fgd")
    assert fgd.needs_boxes and fgd.options["preset"] == "retinanet"
    assert method_info("mgd").options == {"preset": "retinanet", "weight": None,
                                          "mask_ratio": None, "adapter": "auto"}


def test_user_registered_method() -> None:
    """A method registered by a user: built by name and alias, listed; cleanup unregisters it."""
    try:
        @register_method("toy_kd", aliases={"toy_kd_x2": {"scale": 2.0}})
        class ToyKD(DistillMethod):
            """Toy: scaled mean squared difference of the raw features."""

            paper = "nobody, 2026"

            def __init__(self, levels, *, scale: float = 1.0, weight: float = 1.0) -> None:
                super().__init__(levels, weight=weight)
                self.scale = check_positive("scale", scale)

            def forward(self, ctx: DistillContext) -> dict[str, Tensor]:
                self.check_context(ctx)
                total = 0.0
                for name in self.levels:
                    v = ctx.mean_over_images(
                        name, lambda s, t, g: self.scale * (s - t).pow(2).mean())
                    self.level_values[name] = v.detach()
                    total = total + v
                return {"distill": self.weight * total}

        m = build_method("toy_kd", LV, weight=3.0)
        assert isinstance(m, ToyKD) and m.weight == 3.0 and m.scale == 1.0
        assert build_method("toy_kd_x2", LV).scale == 2.0
        info = {i.name: i for i in describe_methods()}["toy_kd"]
        assert info.options == {"scale": 1.0, "weight": 1.0}
        assert info.aliases == {"toy_kd_x2": {"scale": 2.0}}
        assert info.summary.startswith("Toy:") and info.paper == "nobody, 2026"
        with pytest.raises(ValueError, match=r"option\(s\) \['tau'\] are not accepted"):
            build_method("toy_kd", LV, tau=1)
        with pytest.raises(ValueError, match=r"scale=-1 is invalid"):
            build_method("toy_kd", LV, scale=-1)
        with pytest.raises(ValueError, match="already registered"):
            register_method("toy_kd")(ToyKD)
        with pytest.raises(ValueError, match="already registered"):
            register_method("pkd")(ToyKD)
        with pytest.raises(TypeError, match="not a DistillMethod"):
            register_method("toy_bad")(dict)
        ctx, levels = small_context(cs=4, ct=4)
        out = build_method("toy_kd", levels)(ctx)
        assert float(out["distill"]) > 0
    finally:
        METHODS.pop("toy_kd", None)
        ALIASES.pop("toy_kd_x2", None)
    assert "toy_kd" not in METHODS and "toy_kd_x2" not in ALIASES
    assert "toy_kd" not in [i.name for i in describe_methods()]
    with pytest.raises(ValueError, match="unknown"):
        build_method("toy_kd", LV)
