"""Dense-prediction models for Dense Adversary Generation (Xie thesis Ch. 2, Sec 2.3): torchvision segmentation nets
and Faster R-CNN detectors that take [0, 1] images, plus the detection plumbing of Sec 2.3.2 (dense RPN proposals at
NMS IoU 0.9, positive-proposal selection, box-head logits for fixed proposals) that turns each task into the
``logits_fn(x) -> (N, T, C)`` the DAG loop of :mod:`atscale.attacks.dag` attacks.

Models are always built with ``weights=None, weights_backbone=None`` (nothing is downloaded); trained weights come
from a local torchvision state dict (``.pth``/``.pt`` or ``.safetensors``).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
import torchvision.models.detection as tv_det
import torchvision.models.segmentation as tv_seg
from torch import Tensor, nn
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import box_iou

from atscale.config.dense import DETECTION_ARCHS, SEGMENTATION_ARCHS
from atscale.errors import ConfigError
from atscale.layers.swap import swap_modules
from atscale.models.normalize import Normalize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DENSE_NMS_THRESH = 0.9  # Sec 2.3.2: RPN NMS IoU raised from 0.7 so proposals are dense


def dense_task(arch: str) -> str:
    """``"segmentation"`` or ``"detection"`` for a dense arch."""
    if arch in SEGMENTATION_ARCHS:
        return "segmentation"
    if arch in DETECTION_ARCHS:
        return "detection"
    raise ConfigError(f"unknown dense arch '{arch}'",
                      f"choose one of {', '.join(SEGMENTATION_ARCHS + DETECTION_ARCHS)}")


class SegmentationNet(nn.Module):
    """``net(normalize(x))["out"]``: (N, 3, H, W) images in [0, 1] to (N, C, H, W) logits."""

    task = "segmentation"

    def __init__(self, net: nn.Module, num_classes: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.normalize(x))["out"]


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class DetectionNet(nn.Module):
    """A torchvision Faster R-CNN whose transform normalizes [0, 1] images; ``num_classes`` counts the background
    (class 0)."""

    task = "detection"

    def __init__(self, net: nn.Module, num_classes: int):
        super().__init__()
        self.net = net
        self.num_classes = num_classes

    def forward(self, x: Tensor | list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        """Train mode with targets: torchvision's loss dict; eval mode: a list of {boxes, labels, scores}."""
        return self.net(list(x), targets)

    def proposals(self, x: Tensor | list[Tensor], nms_thresh: float = DENSE_NMS_THRESH,
                  top_n: int = 300) -> list[Tensor]:
        """Dense RPN proposals (Sec 2.3.2), eval mode, no grad, (K_i, 4) xyxy in each input image's pixels."""
        rpn, images = self.net.rpn, list(x)
        saved = (rpn.nms_thresh, dict(rpn._post_nms_top_n))
        try:
            rpn.nms_thresh, rpn._post_nms_top_n["testing"] = nms_thresh, top_n
            with _eval_mode(self.net), torch.no_grad():
                batch, _ = self.net.transform(images)
                boxes, _ = rpn(batch, self.net.backbone(batch.tensors))
        finally:
            rpn.nms_thresh, rpn._post_nms_top_n = saved
        return [resize_boxes(b, list(batch.image_sizes[i]), list(img.shape[-2:])) for i, (b, img)
                in enumerate(zip(boxes, images))]

    def class_logits(self, x: Tensor | list[Tensor], proposals: list[Tensor]) -> list[Tensor]:
        """The box head's (K_i, C) class logits for fixed proposals (input pixels, xyxy); differentiable in x."""
        images = list(x)
        if len(proposals) != len(images):
            raise ValueError(f"class_logits got {len(proposals)} proposal sets for {len(images)} images; pass one "
                             "(K_i, 4) tensor per image")
        batch, _ = self.net.transform(images)
        features = self.net.backbone(batch.tensors)
        props = [resize_boxes(p.to(batch.tensors.dtype), list(img.shape[-2:]), list(batch.image_sizes[i]))
                 for i, (p, img) in enumerate(zip(proposals, images))]
        heads = self.net.roi_heads
        feats = heads.box_head(heads.box_roi_pool(features, props, batch.image_sizes))
        logits, _ = heads.box_predictor(feats)
        return list(logits.split([len(p) for p in props]))


def _state_dict_from(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise ConfigError(f"dense model weights '{path}' not found",
                          "give a local torchvision state dict (.pth/.pt/.safetensors) or weights=''")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (any unreadable file is the user's to fix)
        raise ConfigError(f"cannot read dense model weights '{path}' ({type(err).__name__}: {err})",
                          "give a torchvision state dict saved with torch.save or safetensors") from err
    if isinstance(state, Mapping):
        state = state.get("state_dict", state.get("model", state))
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"dense model weights '{path}' is not a state dict of tensors",
                          "save model.state_dict() of the torchvision model")
    if state and all(k.startswith("net.") for k in state):
        state = {k[4:]: v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}  # aux head unused (aux_loss=False)


def _check_state(net: nn.Module, state: Mapping[str, Tensor], num_classes: int, path: Path) -> None:
    own = net.state_dict()
    wrong = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    for k in sorted(wrong):
        a, b = own[k].shape, state[k].shape
        if a[0] == num_classes and a[1:] == b[1:]:
            raise ConfigError(f"dense model weights '{path}' have a {b[0]}-class head ('{k}') but num_classes is "
                              f"{num_classes}", f"set num_classes to {b[0]} or drop the weights (weights='')")
    missing = sorted(k for k in own.keys() - state.keys() if not k.endswith("num_batches_tracked"))
    unexpected = sorted(state.keys() - own.keys())
    if missing or unexpected or wrong:
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(wrong)[:3]]
        raise ConfigError(f"dense model weights '{path}' do not fit {type(net).__name__}: missing {missing[:4]} "
                          f"({len(missing)}), unexpected {unexpected[:4]} ({len(unexpected)}), shapes {shapes}",
                          "give a state dict of the same torchvision arch (keys of the bare model or 'net.'-prefixed)")


def load_dense_weights(net: nn.Module, weights: str | Path, num_classes: int) -> None:
    """Load a local torchvision state dict into the bare torchvision ``net`` with one-line errors."""
    path = Path(weights).expanduser()
    state = _state_dict_from(path)
    _check_state(net, state, num_classes, path)
    net.load_state_dict(state, strict=False)


def build_dense_model(arch: str, num_classes: int, image_size: int, weights: str | Path = "",
                      mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                      **det_options: Any) -> SegmentationNet | DetectionNet:
    """A dense model taking [0, 1] images; ``det_options`` go to the torchvision detection builder. A detector sees
    its input at ``image_size`` unless ``min_size`` / ``max_size`` say otherwise: then its transform rescales
    (bilinear, differentiable) as Faster R-CNN's 600 px rescaling does in the thesis, and boxes come back in input
    pixels, so a perturbation stays in the input's frame (one image size for both tasks, Sec 2.4.3). Detection options
    also take ``anchor_sizes`` (:func:`_set_anchor_sizes`) and ``frozen_bn`` (:func:`freeze_batchnorm` on the
    backbone after ``weights`` are loaded, for fine-tuning)."""
    task = dense_task(arch)
    if num_classes < 2 or image_size < 1:
        raise ConfigError(f"dense model needs num_classes >= 2 (background included) and image_size >= 1; got "
                          f"num_classes={num_classes}, image_size={image_size}", "fix the model config")
    if task == "segmentation":
        if det_options:
            raise ConfigError(f"detection options {sorted(det_options)} given to segmentation arch '{arch}'",
                              "drop them or choose a detection arch")
        extra = {} if arch.startswith("lraspp") else {"aux_loss": False}
        net = getattr(tv_seg, arch)(weights=None, weights_backbone=None, num_classes=num_classes, **extra)
    else:
        anchors, frozen_bn = det_options.pop("anchor_sizes", None), bool(det_options.pop("frozen_bn", False))
        sizes = {"min_size": det_options.pop("min_size", image_size)}
        sizes["max_size"] = det_options.pop("max_size", max(image_size, sizes["min_size"]))
        kwargs = {"num_classes": num_classes, "image_mean": list(mean), "image_std": list(std), **sizes, **det_options}
        try:
            net = (_mobilenet_fpn_detector(arch, **kwargs) if "returned_layers" in det_options
                   else getattr(tv_det, arch)(weights=None, weights_backbone=None, **kwargs))
        except TypeError as err:
            raise ConfigError(f"bad detection option for '{arch}' ({err})",
                              "use torchvision FasterRCNN keyword arguments, e.g. rpn_post_nms_top_n_test") from err
        if anchors is not None:
            _set_anchor_sizes(net, arch, anchors)
    if weights:
        load_dense_weights(net, weights, num_classes)
    if task == "detection" and frozen_bn:
        freeze_batchnorm(net.backbone.body)
    if task == "segmentation":
        return SegmentationNet(net, num_classes, mean, std)
    return DetectionNet(net, num_classes)


def _mobilenet_fpn_detector(arch: str, returned_layers: Sequence[int], **kwargs: Any) -> nn.Module:
    """torchvision's ``fasterrcnn_mobilenet_v3_large_fpn`` built from its own parts, with the FPN taking the
    MobileNetV3 stages ``returned_layers`` (torchvision's choice, [4, 5], gives two stride-32 maps: 4 x 4 at 128 px,
    too coarse for the box head to tell small objects apart; [2, 3, 4, 5] adds strides 8 and 16)."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import mobilenet_backbone

    layers = [int(v) for v in returned_layers]
    if arch != "fasterrcnn_mobilenet_v3_large_fpn" or not layers or not all(0 <= v <= 5 for v in layers):
        raise ConfigError(f"model.options.returned_layers = {returned_layers!r} for '{arch}'",
                          "returned_layers picks MobileNetV3 stages 0..5 of fasterrcnn_mobilenet_v3_large_fpn, e.g. "
                          "[2, 3, 4, 5]; drop it for other archs")
    backbone = mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True,
                                  norm_layer=nn.BatchNorm2d, trainable_layers=6, returned_layers=layers)
    levels = len(layers) + 1  # the FPN's max-pool level comes on top
    anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * levels, ((0.5, 1.0, 2.0),) * levels)
    return tv_det.FasterRCNN(backbone, rpn_anchor_generator=anchors, **kwargs)


def freeze_batchnorm(module: nn.Module) -> int:
    """Replace every ``BatchNorm2d`` under ``module`` by torchvision's ``FrozenBatchNorm2d`` holding its current
    affine parameters and running statistics (what torchvision's detectors do to a pretrained backbone: batches of a
    few large images give poor batch statistics). Returns how many were replaced."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    def frozen(_: str, child: nn.Module) -> nn.Module | None:
        if not isinstance(child, nn.BatchNorm2d):
            return None
        out = FrozenBatchNorm2d(child.num_features, eps=child.eps)
        for key in ("weight", "bias", "running_mean", "running_var"):
            getattr(out, key).copy_(getattr(child, key).detach())
        return out.to(child.running_mean.device)

    return swap_modules(module, frozen)


def _set_anchor_sizes(net: nn.Module, arch: str, sizes: Sequence[int]) -> None:
    """``anchor_sizes``: five sizes in pixels replacing torchvision's (32, 64, 128, 256, 512), for images much smaller
    than the 800 px it assumes: the MobileNetV3 FPN uses all five at each of its levels, the ResNet-50 FPNs one per
    level; the aspect ratios (0.5, 1, 2), and so the RPN head's shapes, stay."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    if len(sizes) != 5 or any(not isinstance(v, (int, float)) or v <= 0 for v in sizes):
        raise ConfigError(f"model.options.anchor_sizes = {sizes!r}", "give five positive sizes in pixels, e.g. "
                          "[12, 16, 24, 32, 48]")
    levels = len(net.rpn.anchor_generator.sizes)
    per_level = (tuple(sizes),) * levels if "mobilenet" in arch else tuple((v,) for v in sizes)
    net.rpn.anchor_generator = AnchorGenerator(per_level, ((0.5, 1.0, 2.0),) * len(per_level))


def select_targets(proposals: Tensor, probs: Tensor, gt_boxes: Tensor, gt_labels: Tensor, iou_min: float = 0.1,
                   score_min: float = 0.1) -> tuple[Tensor, Tensor]:
    """Positive proposals of Sec 2.3.2: IoU with a ground-truth box > ``iou_min`` and softmax score of that box's
    class > ``score_min``; when both hold for several boxes the largest IoU wins (ties: the first). Returns the
    (K', 4) boxes and their (K',) long labels (the ground-truth class)."""
    empty = (proposals.new_zeros((0, 4)), torch.zeros(0, dtype=torch.long, device=proposals.device))
    if len(proposals) == 0 or len(gt_boxes) == 0:
        return empty
    gt_labels = gt_labels.long().to(probs.device)
    if int(gt_labels.max()) >= probs.shape[1] or int(gt_labels.min()) < 0:
        raise ConfigError(f"ground-truth labels {gt_labels.tolist()} fall outside the model's {probs.shape[1]} "
                          "classes", "set num_classes to cover every dataset class (background 0 included)")
    iou = box_iou(proposals.float(), gt_boxes.float().to(proposals.device))
    ok = (iou > iou_min) & (probs[:, gt_labels] > score_min)
    best = torch.where(ok, iou, torch.full_like(iou, -1.0)).argmax(1)
    keep = ok.any(1)
    return proposals[keep], gt_labels[best[keep]]


def detection_targets(net: DetectionNet, x: Tensor, gt: list[dict[str, Tensor]], nms_thresh: float = DENSE_NMS_THRESH,
                      top_n: int = 300, iou_min: float = 0.1, score_min: float = 0.1
                      ) -> tuple[list[Tensor], list[Tensor]]:
    """Per image the selected target boxes and labels: dense proposals, their softmax scores, :func:`select_targets`.
    ``gt``: per image {"boxes": (G, 4) xyxy input pixels, "labels": (G,)}."""
    if len(gt) != len(x):
        raise ValueError(f"detection_targets got {len(gt)} ground-truth dicts for {len(x)} images")
    props = net.proposals(x, nms_thresh, top_n)
    with _eval_mode(net), torch.no_grad():
        probs = [p.softmax(-1) for p in net.class_logits(x, props)]
    picked = [select_targets(p, s, g["boxes"], g["labels"], iou_min, score_min) for p, s, g in zip(props, probs, gt)]
    return [b for b, _ in picked], [lab for _, lab in picked]


def padded_logits(net: DetectionNet, boxes: list[Tensor]) -> tuple[Callable[..., Tensor], Tensor]:
    """``logits_fn(x, rows) -> (len(rows), T, C)`` over each image's fixed boxes, T = max K_i: the box head scores
    only an image's own K_i boxes and the rest of its row is 0; and the (N, T) bool mask of real targets."""
    t = max((len(b) for b in boxes), default=0)
    counts = torch.tensor([len(b) for b in boxes], dtype=torch.long)
    valid = torch.arange(t)[None, :] < counts[:, None]

    def logits_fn(x: Tensor, rows: Tensor | None = None) -> Tensor:
        picked = [boxes[i] for i in (range(len(x)) if rows is None else rows.tolist())]
        if sum(len(b) for b in picked) == 0:
            return x.new_zeros((len(x), t, net.num_classes))
        per = net.class_logits(x, [b.to(x.device) for b in picked])
        return torch.stack([F.pad(lg, (0, 0, 0, t - len(lg))) for lg in per])

    return logits_fn, valid.to(boxes[0].device) if boxes else valid


def pad_labels(labels: list[Tensor], t: int) -> Tensor:
    """(N, T) long labels, padded with 0 (background)."""
    out = torch.zeros(len(labels), t, dtype=torch.long, device=labels[0].device if labels else None)
    for i, lab in enumerate(labels):
        if len(lab) > t:
            raise ValueError(f"pad_labels: image {i} has {len(lab)} labels but T={t}; pass T >= max K_i")
        out[i, :len(lab)] = lab
    return out


def segmentation_targets(masks: Tensor, ignore_index: int = 255) -> tuple[Tensor, Tensor]:
    """(N, H, W) class masks to (N, H*W) labels (ignore pixels set to 0) and the (N, H*W) mask of foreground."""
    flat = masks.flatten(1).long()
    ignored = flat == ignore_index
    labels = flat.masked_fill(ignored, 0)
    return labels, (labels != 0) & ~ignored


__all__ = ["DETECTION_ARCHS", "DENSE_NMS_THRESH", "DetectionNet", "IMAGENET_MEAN", "IMAGENET_STD",
           "SEGMENTATION_ARCHS", "SegmentationNet", "build_dense_model", "dense_task", "detection_targets",
           "load_dense_weights", "pad_labels", "padded_logits", "segmentation_targets", "select_targets"]
