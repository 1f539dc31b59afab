"""Dense models for DAG (issue 15; Xie thesis Sec 2.3, 2.3.2): every arch builds offline, normalization sits inside,
local weights round-trip with clear errors, positive proposals follow Sec 2.3.2, box-head logits for fixed proposals
match torchvision's roi_heads, and dense proposals use NMS 0.9."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from atscale.attacks.dag import DAG, GAMMA
from atscale.errors import ConfigError
from atscale.models.dense import (DETECTION_ARCHS, SEGMENTATION_ARCHS, DetectionNet, SegmentationNet,
                                  build_dense_model, dense_task, detection_targets, pad_labels, padded_logits,
                                  segmentation_targets, select_targets)

SIZE = 64
DET = "fasterrcnn_mobilenet_v3_large_fpn"
SEG = "lraspp_mobilenet_v3_large"


def _images(n: int = 2, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def det() -> DetectionNet:
    torch.manual_seed(0)
    net = build_dense_model(DET, 5, SIZE, rpn_score_thresh=0.0)
    assert isinstance(net, DetectionNet)
    return net.eval()


@pytest.mark.parametrize("arch", SEGMENTATION_ARCHS + DETECTION_ARCHS)
def test_every_arch_builds_offline_with_its_task_and_output(arch: str) -> None:
    torch.manual_seed(0)
    net = build_dense_model(arch, 11, SIZE).eval()
    assert net.task == dense_task(arch) and net.num_classes == 11
    with torch.no_grad():
        out = net(_images(1))
    if net.task == "segmentation":
        assert out.shape == (1, 11, SIZE, SIZE)
    else:
        assert set(out[0]) == {"boxes", "labels", "scores"} and out[0]["boxes"].shape[1] == 4
        assert net.net.transform.min_size == (SIZE,) and net.net.transform.max_size == SIZE


def test_unknown_arch_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="fcn_resnet50.*fasterrcnn_mobilenet_v3_large_fpn"):
        dense_task("maskrcnn")
    with pytest.raises(ConfigError, match="deeplabv3_resnet50"):
        build_dense_model("resnet50", 11, SIZE)


def test_segmentation_normalizes_inside() -> None:
    torch.manual_seed(0)
    net = build_dense_model(SEG, 4, SIZE, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)).eval()
    assert isinstance(net, SegmentationNet)
    x = _images()
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(net(x), net.net((x - mean) / std)["out"], atol=1e-6)


def test_detection_normalizes_inside_its_transform(det: DetectionNet) -> None:
    x = _images(1)
    batch, _ = det.net.transform(list(x))
    assert batch.image_sizes == [(SIZE, SIZE)]
    mean, std = torch.tensor(det.net.transform.image_mean), torch.tensor(det.net.transform.image_std)
    assert torch.allclose(batch.tensors[0], (x[0] - mean.view(3, 1, 1)) / std.view(3, 1, 1), atol=1e-6)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_round_trip(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(1)
    src = build_dense_model(SEG, 4, SIZE).eval()
    path = tmp_path / f"seg{suffix}"
    state = {k: v.contiguous() for k, v in src.net.state_dict().items()}
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))
    torch.manual_seed(2)
    dst = build_dense_model(SEG, 4, SIZE, weights=str(path)).eval()
    x = _images(1)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def test_wrapper_prefixed_detection_weights_round_trip(tmp_path: Path, det: DetectionNet) -> None:
    path = tmp_path / "det.pt"
    torch.save(det.state_dict(), path)
    assert all(k.startswith("net.") for k in torch.load(path))
    other = build_dense_model(DET, 5, SIZE, weights=path, rpn_score_thresh=0.0).eval()
    x = _images(1)
    with torch.no_grad():
        a, b = det(x)[0], other(x)[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])


def test_weights_with_another_class_count_or_missing_file_error_clearly(tmp_path: Path) -> None:
    voc = tmp_path / "voc.pth"
    torch.save(build_dense_model(SEG, 21, SIZE).net.state_dict(), voc)
    with pytest.raises(ConfigError, match=r"21-class head.*num_classes is 11.*set num_classes to 21"):
        build_dense_model(SEG, 11, SIZE, weights=str(voc))
    with pytest.raises(ConfigError, match="nope.pth"):
        build_dense_model(SEG, 11, SIZE, weights=str(tmp_path / "nope.pth"))
    with pytest.raises(ConfigError, match="missing"):
        build_dense_model("deeplabv3_mobilenet_v3_large", 21, SIZE, weights=str(voc))


def test_weights_of_a_detector_with_another_class_count(tmp_path: Path, det: DetectionNet) -> None:
    path = tmp_path / "det.pth"
    torch.save(det.net.state_dict(), path)
    with pytest.raises(ConfigError, match=r"5-class head.*num_classes is 11"):
        build_dense_model(DET, 11, SIZE, weights=str(path))


def _probs(k: int, c: int, hot: dict[tuple[int, int], float]) -> torch.Tensor:
    p = torch.full((k, c), 0.01)
    for (i, j), v in hot.items():
        p[i, j] = v
    return p


def test_select_targets_follows_sec_2_3_2() -> None:
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0]])
    labels = torch.tensor([1, 2])
    props = torch.tensor([[1.0, 0.0, 11.0, 10.0],  # IoU 0.82 with box 0, 0.43 with box 1: box 0 (class 1) wins
                          [4.0, 0.0, 14.0, 10.0],  # 0.43 vs 0.82: box 1 (class 2) wins
                          [40.0, 40.0, 50.0, 50.0],  # no overlap
                          [0.0, 0.0, 10.0, 1.0],  # IoU 0.1 exactly with box 0: not > 0.1
                          [0.0, 0.0, 10.0, 10.0]])  # IoU 1, but its class-1 score is 0.1: not > 0.1
    probs = _probs(5, 3, {(0, 1): 0.5, (0, 2): 0.3, (1, 1): 0.3, (1, 2): 0.5, (2, 1): 0.9, (3, 1): 0.9,
                          (4, 1): 0.1, (4, 2): 0.05})
    boxes, lab = select_targets(props, probs, gt, labels)
    assert torch.equal(boxes, props[:2]) and torch.equal(lab, torch.tensor([1, 2])) and lab.dtype == torch.long


def test_select_targets_takes_the_largest_iou_among_boxes_that_pass_both_conditions() -> None:
    gt, labels = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0]]), torch.tensor([1, 2])
    props = torch.tensor([[1.0, 0.0, 11.0, 10.0]])  # closest is box 0, but class 1 is not confident
    boxes, lab = select_targets(props, _probs(1, 3, {(0, 2): 0.6}), gt, labels)
    assert lab.tolist() == [2]


def test_select_targets_with_nothing_to_select() -> None:
    gt, labels = torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([1])
    for props, g, lab in [(torch.zeros(0, 4), gt, labels), (torch.tensor([[0.0, 0.0, 5.0, 5.0]]), torch.zeros(0, 4),
                                                             torch.zeros(0, dtype=torch.long))]:
        boxes, out = select_targets(props, torch.rand(len(props), 3), g, lab)
        assert boxes.shape == (0, 4) and out.shape == (0,) and out.dtype == torch.long


def _roi_heads_logits(det: DetectionNet, x: torch.Tensor, props: list[torch.Tensor]) -> torch.Tensor:
    """torchvision's roi_heads forward on given (transformed-coordinate) proposals; the predictor's logits."""
    seen: list[torch.Tensor] = []
    hook = det.net.roi_heads.box_predictor.register_forward_hook(lambda m, i, o: seen.append(o[0]))
    try:
        with torch.no_grad():
            batch, _ = det.net.transform(list(x))
            det.net.roi_heads(det.net.backbone(batch.tensors), props, batch.image_sizes)
    finally:
        hook.remove()
    return seen[0]


def test_class_logits_match_roi_heads_and_have_a_gradient(det: DetectionNet) -> None:
    x = _images()
    props = [torch.tensor([[2.0, 3.0, 30.0, 40.0], [10.0, 10.0, 60.0, 50.0]]), torch.tensor([[0.0, 0.0, 64.0, 64.0]])]
    xr = x.clone().requires_grad_(True)
    logits = det.class_logits(xr, props)
    assert [t.shape for t in logits] == [(2, 5), (1, 5)]
    assert torch.allclose(torch.cat(logits).detach(), _roi_heads_logits(det, x, props), atol=1e-5)
    (g,) = torch.autograd.grad(torch.cat(logits)[:, 1].sum(), xr)
    assert g.abs().sum() > 0 and g.shape == x.shape


def test_class_logits_map_proposals_when_the_transform_resizes(det: DetectionNet) -> None:
    x = _images(1, size=48)  # resized to 64: proposals scale by 4/3
    props = [torch.tensor([[3.0, 6.0, 30.0, 36.0]])]
    got = det.class_logits(x, props)[0].detach()
    assert torch.allclose(got, _roi_heads_logits(det, x, [props[0] * 4 / 3]), atol=1e-5)


def test_dense_proposals_use_nms_09_and_restore_the_rpn(det: DetectionNet) -> None:
    rpn, x = det.net.rpn, _images()
    before = (rpn.nms_thresh, dict(rpn._post_nms_top_n), det.training)
    dense = det.proposals(x, top_n=5000)
    sparse = det.proposals(x, nms_thresh=0.7, top_n=5000)
    assert (rpn.nms_thresh, rpn._post_nms_top_n, det.training) == before
    assert all(len(d) >= len(s) for d, s in zip(dense, sparse)) and sum(map(len, dense)) > sum(map(len, sparse))
    assert all(p.shape[1] == 4 and p.min() >= 0 and p.max() <= SIZE for p in dense)
    assert len(det.proposals(x, top_n=7)[0]) <= 7


def test_proposals_restore_the_rpn_on_error(det: DetectionNet) -> None:
    rpn = det.net.rpn
    before = (rpn.nms_thresh, dict(rpn._post_nms_top_n))
    with pytest.raises(Exception):
        det.proposals([torch.rand(3, 2)])
    assert (rpn.nms_thresh, rpn._post_nms_top_n) == before


def test_detection_targets_and_padded_logits(det: DetectionNet) -> None:
    x = _images()
    gt = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([2])},
          {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    boxes, labels = detection_targets(det, x, gt)
    assert len(boxes[1]) == 0 and labels[1].dtype == torch.long
    strict, _ = detection_targets(det, x, gt, iou_min=0.5, score_min=0.5)
    assert len(strict[0]) < len(boxes[0])
    assert len(boxes[0]) >= 3 and torch.all(labels[0] == 2) and len(boxes[0]) == len(labels[0])
    fn, valid = padded_logits(det, [boxes[0][:3], boxes[1]])
    out = fn(x)
    assert out.shape == (2, 3, 5) and valid.tolist() == [[True] * 3, [False] * 3]
    assert torch.equal(pad_labels([torch.tensor([2, 3, 1]), torch.zeros(0, dtype=torch.long)], 3),
                       torch.tensor([[2, 3, 1], [0, 0, 0]]))
    fn0, valid0 = padded_logits(det, [torch.zeros(0, 4), torch.zeros(0, 4)])
    assert fn0(x).shape == (2, 0, 5) and valid0.shape == (2, 0)
    fn, valid = padded_logits(det, boxes)  # the DAG loop runs on these targets
    with torch.no_grad():  # an image's logits do not depend on the rest of the batch (DAG drops converged rows)
        assert torch.allclose(fn(x[:1], torch.tensor([0])), fn(x)[:1], atol=1e-5)
        pred = fn(x).argmax(-1)  # untrained: take its own predictions as l_n, so every target starts active
    res = DAG(max_iters=2).perturb(fn, x, pred, valid=valid, adv_labels=(pred + 1) % 5)
    assert res.x_adv.shape == x.shape and res.iters[1] == 0 and res.r[1].abs().amax() == 0
    assert 0 < res.r[0].abs().amax() <= 2 * GAMMA + 1e-6


def test_padded_logits_score_only_each_images_own_boxes() -> None:
    class Fake:
        num_classes = 3

        def class_logits(self, x: torch.Tensor, props: list[torch.Tensor]) -> list[torch.Tensor]:
            self.seen = props
            return [p[:, :3] for p in props]

    fake = Fake()
    fn, valid = padded_logits(fake, [torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.zeros(0, 4),  # type: ignore[arg-type]
                                     torch.tensor([[5.0, 6.0, 7.0, 8.0], [9.0, 9.0, 9.0, 9.0]])])
    out = fn(torch.zeros(3, 3, 8, 8))
    assert out.shape == (3, 2, 3) and out[0, 1].abs().sum() == 0 and out[1].abs().sum() == 0
    assert [p.tolist() for p in fake.seen] == [[[1, 2, 3, 4]], [], [[5, 6, 7, 8], [9, 9, 9, 9]]]
    assert valid.tolist() == [[True, False], [False, False], [True, True]]
    sub = fn(torch.zeros(1, 3, 8, 8), torch.tensor([2]))  # DAG passes the rows still attacked
    assert sub.shape == (1, 2, 3) and [p.tolist() for p in fake.seen] == [[[5, 6, 7, 8], [9, 9, 9, 9]]]
    assert fn(torch.zeros(1, 3, 8, 8), torch.tensor([1])).abs().sum() == 0


def test_segmentation_targets() -> None:
    masks = torch.tensor([[[0, 1], [255, 3]]])
    labels, valid = segmentation_targets(masks)
    assert labels.tolist() == [[0, 1, 0, 3]] and valid.tolist() == [[False, True, False, True]]



def test_anchor_sizes_for_small_images() -> None:
    net = build_dense_model(DET, 5, SIZE, anchor_sizes=[8, 12, 16, 24, 32])
    assert net.net.rpn.anchor_generator.sizes == ((8, 12, 16, 24, 32),) * 3
    with torch.no_grad():
        assert len(net.eval()(torch.rand(1, 3, SIZE, SIZE))) == 1  # the RPN head's shapes still fit
    with pytest.raises(ConfigError, match="five positive sizes"):
        build_dense_model(DET, 5, SIZE, anchor_sizes=[8, 16])


def test_frozen_bn_keeps_the_loaded_statistics_in_training(tmp_path: Path) -> None:
    path = tmp_path / "det.pt"
    torch.manual_seed(0)
    det = build_dense_model(DET, 5, SIZE)
    with torch.no_grad():  # statistics a pretrained backbone would have
        for m in det.net.backbone.body.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    torch.save(det.state_dict(), path)
    tuned = build_dense_model(DET, 5, SIZE, weights=path, frozen_bn=True)
    body = tuned.net.backbone.body
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    before = {k: v.clone() for k, v in body.state_dict().items()}
    assert all(torch.equal(before[k], det.net.backbone.body.state_dict()[k]) for k in before)
    tuned.train()
    opt = torch.optim.SGD(tuned.parameters(), lr=0.1)
    boxes = [{"boxes": torch.tensor([[8.0, 8, 40, 40]]), "labels": torch.tensor([1])}] * 2
    sum(tuned(_images(2), boxes).values()).backward()
    opt.step()
    after = body.state_dict()
    frozen = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    plain = build_dense_model(DET, 5, SIZE, weights=path)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.net.backbone.body.modules())


def test_frozen_bn_without_weights_is_refused() -> None:
    from atscale.config.dense import load_dense_config

    with pytest.raises(ConfigError, match="frozen_bn.*model.weights is empty"):
        load_dense_config(None, [f"model.arch={DET}", "model.options.frozen_bn=true"])


def test_detector_rescaling_inside_keeps_boxes_and_gradients_in_the_input_frame() -> None:
    up = build_dense_model(DET, 5, SIZE, min_size=2 * SIZE, rpn_score_thresh=0.0).eval()
    assert up.net.transform.min_size == (2 * SIZE,) and up.net.transform.max_size == 2 * SIZE
    x = _images(1).requires_grad_(True)
    batch, _ = up.net.transform(list(x))
    assert batch.tensors.shape[-2:] == (2 * SIZE, 2 * SIZE)
    props = up.proposals(x.detach())
    assert props[0].numel() and float(props[0].max()) <= SIZE
    box = torch.tensor([[8.0, 8, 40, 40]])
    logits = up.class_logits(x, [box])[0]
    logits[0, 1].backward()
    assert x.grad.shape == x.shape and float(x.grad.abs().sum()) > 0
    # the same box in the 2x frame of a model that sees the rescaled image directly gives the same logits
    same = build_dense_model(DET, 5, 2 * SIZE, rpn_score_thresh=0.0).eval()
    same.load_state_dict(up.state_dict())
    with torch.no_grad():
        direct = same.class_logits(batch.tensors, [box * 2])[0]
    assert torch.allclose(direct, logits.detach(), atol=1e-5)


def test_returned_layers_add_finer_fpn_levels_and_are_refused_elsewhere() -> None:
    torch.manual_seed(0)
    fine = build_dense_model(DET, 5, SIZE, returned_layers=[2, 3, 4, 5], rpn_score_thresh=0.0).eval()
    plain = build_dense_model(DET, 5, SIZE).eval()
    with torch.no_grad():
        maps = fine.net.backbone(_images(1))
        coarse = plain.net.backbone(_images(1))
    assert [tuple(v.shape[-2:]) for v in maps.values()] == [(8, 8), (4, 4), (2, 2), (2, 2), (1, 1)]
    assert [tuple(v.shape[-2:]) for v in coarse.values()] == [(2, 2), (2, 2), (1, 1)]
    assert len(fine.net.rpn.anchor_generator.sizes) == len(maps)
    # the same torchvision parts: stages [4, 5] give torchvision's own model, key for key
    same = build_dense_model(DET, 5, SIZE, returned_layers=[4, 5])
    assert same.state_dict().keys() == plain.state_dict().keys()
    x = _images(1)
    with torch.no_grad():
        assert fine(x)[0]["boxes"].shape[1] == 4
    sized = build_dense_model(DET, 5, SIZE, returned_layers=[2, 3, 4, 5], anchor_sizes=[8, 16, 24, 32, 48])
    assert sized.net.rpn.anchor_generator.sizes == ((8, 16, 24, 32, 48),) * 5
    with pytest.raises(ConfigError, match="returned_layers picks MobileNetV3 stages"):
        build_dense_model("fasterrcnn_resnet50_fpn", 5, SIZE, returned_layers=[2, 3])
    with pytest.raises(ConfigError, match="returned_layers"):
        build_dense_model(DET, 5, SIZE, returned_layers=[7])
