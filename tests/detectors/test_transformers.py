"""transformers' DETR family as structkd detectors: losses, predictions, taps, build, fit.

Each result is checked against an independent computation: the wrapped model's own loss on
labels converted by hand (NumPy), transformers' image processor post-processing, a dry run's
strides, and a model reloaded by transformers from the run's ``save_pretrained`` folder.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import structkd  # noqa: E402
from kdtest import IMAGE_SIZE, assert_same_detections, slow_except  # noqa: E402
from structkd.data import CocoDetection, build_transforms  # noqa: E402
from structkd.detectors import TransformersDetector, as_detector, detector_family  # noqa: E402
from structkd.detectors.transformers_build import (  # noqa: E402
    TRANSFORMERS_TYPES,
    transformers_detector,
)
from structkd.distill import Distiller  # noqa: E402
from structkd.models import DetectorSpec, build_detector  # noqa: E402

K = 5  # object classes; structkd's num_classes = K + 1


def _images_targets(size: int = 64):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=g) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[4.0, 8.0, 40.0, 36.0], [30.0, 2.0, 60.0, 20.0]]),
         "labels": torch.tensor([1, K]), "image_id": 1},
        {"boxes": torch.tensor([[10.0, 12.0, 22.0, 50.0]]), "labels": torch.tensor([3]),
         "image_id": 2},
    ]
    return images, targets


def _by_hand(targets, size: int) -> list[dict[str, torch.Tensor]]:
    """transformers' labels written from their definition: class ids 0..K-1, boxes as
    (cx, cy, w, h) over the image's width and height."""
    out = []
    for t in targets:
        b = t["boxes"].numpy().astype(np.float64)
        cxcywh = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2,
                           b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1) / size
        out.append({"class_labels": t["labels"] - 1,
                    "boxes": torch.from_numpy(cxcywh).float()})
    return out


@pytest.mark.parametrize("kind", slow_except(sorted(TRANSFORMERS_TYPES), *sorted(
    set(TRANSFORMERS_TYPES) - {"d_fine"})))  # D-FINE's loss alone takes 9 s here
def test_the_losses_are_the_models_own_on_labels_converted_by_hand(kind) -> None:
    torch.manual_seed(0)
    det = transformers_detector(kind, K + 1, num_queries=50, min_size=64, max_size=64)
    assert isinstance(det, TransformersDetector) and det.model.config.num_labels == K
    images, targets = _images_targets()
    det.train()
    # The denoising queries draw random numbers: the model's own call starts from the RNG
    # state the wrapped model was called with.
    state = []
    hook = det.model.register_forward_pre_hook(lambda *a: state.append(torch.get_rng_state()))
    ours = det(images, targets)
    hook.remove()
    torch.set_rng_state(state[0])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (det.transform.image_mean,
                                                            det.transform.image_std))
    pixels = (torch.stack(images) - mean) / std  # the family's normalisation (DETR: ImageNet)
    theirs = det.model(pixel_values=pixels, labels=_by_hand(targets, 64))
    if torch.allclose(sum(theirs.loss_dict.values()), theirs.loss):
        assert set(ours) == set(theirs.loss_dict)  # the terms, where they make up the loss
    else:  # DETR's loss_dict is unweighted (and holds a cardinality error): its loss alone
        assert set(ours) == {"loss"}
    total = sum(ours.values())
    assert torch.allclose(total, theirs.loss, rtol=1e-5, atol=1e-6)
    total.backward()
    grads = [p.grad for p in det.model.model.encoder.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


PROCESSORS = {  # model type -> (image processor, its post-processing options)
    "rt_detr": ("RTDetrImageProcessor", {"use_focal_loss": True}),
    "deformable_detr": ("DeformableDetrImageProcessor", {"top_k": 50}),
    "detr": ("DetrImageProcessor", {}),
}


@pytest.mark.parametrize("kind", sorted(PROCESSORS))
def test_predictions_follow_the_image_processor(kind) -> None:
    """Sigmoid top-k (RT-DETR, Deformable DETR) or softmax best-class-per-query (DETR)
    post-processing, and the resize back to the original image: the boxes of a 32 px image
    resized to 64 are the processor's boxes at 64 px, halved."""
    torch.manual_seed(0)
    det = transformers_detector(kind, K + 1, num_queries=50, min_size=64, max_size=64,
                                detections_per_img=50).eval()
    g = torch.Generator().manual_seed(3)
    small = torch.rand(3, 32, 32, generator=g)
    with torch.no_grad():
        ours = det([small])[0]
        x = torch.nn.functional.interpolate(small[None], size=(64, 64), mode="bilinear",
                                            align_corners=False)
        x = (x - torch.tensor(det.transform.image_mean).view(1, 3, 1, 1)) / torch.tensor(
            det.transform.image_std).view(1, 3, 1, 1)
        out = det.model(pixel_values=x)
    processor, options = PROCESSORS[kind]
    ref = getattr(transformers, processor)().post_process_object_detection(
        out, threshold=0.0, target_sizes=[(64, 64)], **options)[0]
    order = ref["scores"].argsort(descending=True, stable=True)
    assert len(ours["scores"]) == len(order) == 50
    assert torch.allclose(ours["scores"], ref["scores"][order], atol=1e-5)
    assert torch.equal(ours["labels"], ref["labels"][order] + 1)
    assert torch.allclose(ours["boxes"], ref["boxes"][order].clamp(0, 64) / 2, atol=1e-3)


def test_a_batch_smaller_than_the_queries_need_is_refused() -> None:
    det = transformers_detector("rt_detr", K + 1, min_size=64, max_size=64).eval()
    with pytest.raises(ValueError, match=r"a 64x64 batch gives 84 encoder positions, fewer than "
                                         r"the model's num_queries=100: use larger images"):
        det([torch.rand(3, 64, 64)])


def test_labels_outside_the_models_classes_are_refused() -> None:
    det = transformers_detector("rt_detr", K + 1, num_queries=50, min_size=64, max_size=64).train()
    images, targets = _images_targets()
    targets[1]["labels"] = torch.tensor([K + 1])
    with pytest.raises(ValueError, match=rf"label {K + 1} of image 2 is outside 1..{K} "):
        det(images, targets)


def test_the_adapter_is_found_by_type_and_names_the_family() -> None:
    det = transformers_detector("d_fine", K + 1)
    assert as_detector(det.model).model is det.model
    assert as_detector(det) is det
    assert detector_family(det) == "detr"
    assert detector_family(build_detector(DetectorSpec("fcos", K + 1, "resnet18"))) == "fcos"


@pytest.mark.parametrize("student_kind", ["rt_detr", "torchvision"])
def test_levels_pair_by_stride_across_families_and_the_teacher_stops_early(student_kind) -> None:
    torch.manual_seed(0)
    retina = build_detector(DetectorSpec("retinanet", K + 1, "resnet18", fpn_channels=32,
                                         min_size=64, max_size=64))
    detr = transformers_detector("rt_detr", K + 1, num_queries=50, min_size=64, max_size=64)
    student, teacher = (detr, retina) if student_kind == "rt_detr" else (retina, detr)
    calls = []
    if teacher is detr:
        detr.model.model.decoder.register_forward_hook(lambda *a: calls.append(1))
    d = Distiller(student, teacher, "ssim")
    assert [(p.name, p.stride) for p in d.pairs] == [("s8", 8), ("s16", 16), ("s32", 32)]
    d.train()
    images, targets = _images_targets()
    out = d(images, targets)
    assert "distill" in out and torch.isfinite(out["distill"])
    sum(out.values()).backward()
    assert calls == []  # the teacher's decoder never ran: its levels are the encoder's
    d.close()


def test_a_hub_name_offline_fails_at_once_with_what_to_do(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"could not load 'someone/rtdetr' .* offline, pass a "
                                         r"local save_pretrained folder"):
        transformers_detector("someone/rtdetr", K + 1)
    with pytest.raises(ValueError, match=r"is not a folder"):
        transformers_detector("./missing_folder", K + 1)


@pytest.mark.slow  # the README's transformers example runs fit with a save_pretrained in CI
def test_fit_distils_a_torchvision_teacher_into_rt_detr(coco_data, tmp_path) -> None:
    """The Python API end to end: an RT-DETR student, a RetinaNet teacher, the run folder, the
    eval table by class name, and the student saved as transformers saves it (reloaded by
    transformers, it predicts what the trained student predicts)."""
    torch.manual_seed(0)
    train = CocoDetection(coco_data.train_ann, coco_data.train_images, build_transforms(True))
    val = CocoDetection(coco_data.val_ann, coco_data.val_images, build_transforms(False))
    k = train.num_classes - 1
    hf = transformers_detector("rt_detr", k + 1, num_queries=50, min_size=IMAGE_SIZE,
                               max_size=IMAGE_SIZE).model
    teacher = build_detector(DetectorSpec("retinanet", k + 1, "resnet18", fpn_channels=32,
                                          min_size=IMAGE_SIZE, max_size=IMAGE_SIZE))
    result = structkd.fit(hf, train, val, teacher=teacher, method="mgd", epochs=1,
                          batch_size=4, num_workers=0, progress=False, threads=1,
                          warmup_iters=1, lr=1e-4, optimizer="adamw",
                          out_dir=tmp_path / "run")
    assert result.steps == 2 and result.method["name"] == "mgd"
    assert set(result.metrics["per_class"]) == set(train.class_names[1:])
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["metrics"]["AP"] == result.metrics["AP"]
    native = tmp_path / "run" / "student_native"
    reloaded = transformers.AutoModelForObjectDetection.from_pretrained(native).eval()
    wrapped = as_detector(reloaded, min_size=IMAGE_SIZE, max_size=IMAGE_SIZE).eval()
    trained = as_detector(hf, min_size=IMAGE_SIZE, max_size=IMAGE_SIZE).eval()
    images = [val[i][0] for i in range(2)]
    with torch.no_grad():
        a, b = trained(images), wrapped(images)
    for x, y in zip(a, b, strict=True):
        assert torch.allclose(x["boxes"], y["boxes"], atol=1e-4)
        assert torch.allclose(x["scores"], y["scores"], atol=1e-5)


@pytest.mark.parametrize("kind", ["rt_detr", "d_fine", "deformable_detr", "detr"])
def test_onnx_export_matches_pytorch(kind, tmp_path) -> None:
    """The exported graph (resize, model, the family's post-processing, the resize back) gives
    PyTorch's detections in ONNX Runtime. The weights are perturbed: at random init RT-DETR's
    encoder scores every position alike, so its query selection is a tie that two runtimes
    break differently (a trained model has no such ties)."""
    from structkd.models.onnx import OnnxDetector, export_onnx, read_onnx_metadata

    torch.manual_seed(0)
    det = transformers_detector(kind, K + 1, num_queries=50, min_size=64, max_size=64,
                                detections_per_img=30).eval()
    with torch.no_grad():
        for p in det.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    path = export_onnx(det, tmp_path / "s.onnx", class_names=["__background__",
                                                               *"abcde"])
    meta = read_onnx_metadata(path)
    assert meta["arch"] == f"transformers:{kind}" and meta["class_names"][1:] == list("abcde")
    onnx_det = OnnxDetector(path)
    g = torch.Generator().manual_seed(1)
    for image in (torch.rand(3, 64, 64, generator=g), torch.rand(3, 64, 64, generator=g)):
        with torch.no_grad():
            ref = det([image])[0]
        got = onnx_det([image])[0]
        assert len(ref["scores"]) == 30 and set(got["labels"].tolist()) <= set(range(1, K + 1))
        assert_same_detections(ref, got, box_atol=1e-2, score_atol=1e-4)
    with pytest.raises(ValueError, match=r"fixed input size .* pass image_size"):
        export_onnx(det, tmp_path / "d.onnx", dynamic=True)


@pytest.mark.parametrize(("kind", "strides"), [("detr", [32]), ("conditional_detr", [32]),
                                               ("deformable_detr", [8, 16, 32]),
                                               ("d_fine", [8, 16, 32])])
def test_default_taps_of_each_type_pair_with_a_torchvision_teacher(kind, strides) -> None:
    torch.manual_seed(0)
    retina = build_detector(DetectorSpec("retinanet", K + 1, "resnet18", fpn_channels=32,
                                         min_size=64, max_size=64))
    det = transformers_detector(kind, K + 1, num_queries=50, min_size=64, max_size=64)
    d = Distiller(det, retina, "mse").train()
    assert [p.stride for p in d.pairs] == strides
    images, targets = _images_targets()
    out = d(images, targets)
    assert torch.isfinite(out["distill"]) and out["distill"] > 0
    d.close()


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory: pytest.TempPathFactory):
    det = transformers_detector("rt_detr", 7, num_queries=50)
    folder = tmp_path_factory.mktemp("saved") / "rtdetr"
    det.save_native(folder)
    return det, folder


def _broken(folder, dest, what: str):
    import shutil

    shutil.copytree(folder, dest)
    weights = dest / "model.safetensors"
    if what == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif what == "cut config":
        config = dest / "config.json"
        config.write_text(config.read_text()[:200])
    elif what == "no weights":
        weights.unlink()
    elif what == "foreign pickled weights":  # a plain state dict of another model
        weights.unlink()
        torch.save({"conv.weight": torch.zeros(3)}, dest / "pytorch_model.bin")
    return dest


@pytest.mark.parametrize(("what", "message"), [
    ("truncated weights", r"not a loadable save_pretrained folder \(SafetensorError: "),
    ("cut config", r"not a loadable save_pretrained folder \(OSError: .*config.json.* is not "
                   r"a valid JSON file"),
    ("no weights", r"not a loadable save_pretrained folder \(OSError: Error no file named "
                   r"model.safetensors"),
    ("foreign pickled weights", r"its weights lack \d+ of the model's tensors"),
])
def test_a_broken_folder_is_one_line_never_random_weights(saved_folder, tmp_path, what,
                                                          message) -> None:
    """transformers would train on, or initialise at random, what these folders lack."""
    det, folder = saved_folder
    broken = _broken(folder, tmp_path / "broken", what)
    with pytest.raises(ValueError, match=rf"^{broken}: {message}") as error:
        transformers_detector(str(broken), 7)
    assert "\n" not in str(error.value)
    loaded = transformers_detector(str(folder), 7, num_queries=50)  # the intact one loads
    state = loaded.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in det.state_dict().items())
