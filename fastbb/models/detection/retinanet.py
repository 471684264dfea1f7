"""torchvision's RetinaNet, fused: the same classes, builders, arguments, state_dict keys and outputs as
torchvision.models.detection's, over fastbb's fused ResNet + FPN backbone, with anchors computed once per
shape, the training loss for the whole batch at once, and fastbb's batched post-processing."""
import enum
import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import ResNet50_Weights
from torchvision.models._utils import _ovewrite_value_param
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection import retinanet as tv_retinanet
from torchvision.models.detection.anchor_utils import AnchorGenerator as _TorchvisionAnchorGenerator
from torchvision.models.detection.backbone_utils import _validate_trainable_layers
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet_ResNet50_FPN_V2_Weights, RetinaNet_ResNet50_FPN_Weights

from fastbb.models.detection.backbone_utils import resnet_fpn_extractor
from fastbb.models.detection.retinanet_head import (RetinaNetClassificationHead, RetinaNetHead,
                                                    RetinaNetRegressionHead)
from fastbb.models.resnet import resnet50
from fastbb.nn.conv_bn_relu import FrozenBatchNorm2d
from fastbb.nn.fpn import LastLevelP6P7
from fastbb.ops.retinanet_loss import pad_targets, retinanet_loss
from fastbb.ops.retinanet_postprocess import retinanet_postprocess

__all__ = ["AnchorGenerator", "RetinaNet", "RetinaNetClassificationHead", "RetinaNetHead", "RetinaNetRegressionHead",
           "RetinaNet_ResNet50_FPN_Weights", "RetinaNet_ResNet50_FPN_V2_Weights", "retinanet_resnet50_fpn",
           "retinanet_resnet50_fpn_v2"]

_DEFAULT_XFORM_CLIP = math.log(1000.0 / 16)

# torchvision's own classes, held here: fastbb.patch_torchvision() replaces the module attributes.
_TorchvisionRetinaNet = tv_retinanet.RetinaNet
_TorchvisionHead = tv_retinanet.RetinaNetHead
_TorchvisionClassificationHead = tv_retinanet.RetinaNetClassificationHead
_TorchvisionRegressionHead = tv_retinanet.RetinaNetRegressionHead


def _plain_tensor(t):
    """Whether t is an eager, ordinary tensor (not a fake, functional or traced one), whose derived values may
    be kept across calls."""
    return (type(t) is torch.Tensor and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and not torch.jit.is_scripting())


class AnchorGenerator(_TorchvisionAnchorGenerator):
    """
    torchvision's AnchorGenerator (same arguments, attributes and anchors) that computes the anchors once
    per (padded image size, feature map sizes, device, dtype) and keeps the last ``cache_size`` of them:
    torchvision rebuilds every anchor at every call. Every image of a batch gets the same tensor (read-only
    by convention, as torchvision's code treats anchors). Under torch.compile, torch.export, fx or
    TorchScript tracing the anchors are computed as torchvision does.

    Args:
        sizes (Tuple[Tuple[int]]): anchor sizes per feature map.
        aspect_ratios (Tuple[Tuple[float]]): aspect ratios per feature map.
        cache_size (int): how many shapes' anchors are kept. Default: 8.
    """

    def __init__(self, sizes: tuple[tuple[int, ...], ...] = ((128, 256, 512),),
                 aspect_ratios: tuple[tuple[float, ...], ...] = ((0.5, 1.0, 2.0),), cache_size: int = 8) -> None:
        super().__init__(sizes, aspect_ratios)
        self.cache_size = cache_size
        self._cache: OrderedDict = OrderedDict()

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        """
        Args:
            image_list (ImageList): the batch (its padded tensor's size and its number of images are used).
            feature_maps (List[Tensor]): the feature maps of every level.

        Returns:
            List[Tensor[A, 4]]: the anchors of each image (x1, y1, x2, y2), levels concatenated.
        """
        first = feature_maps[0]
        if self.cache_size <= 0 or not _plain_tensor(first) or not _plain_tensor(image_list.tensors):
            return super().forward(image_list, feature_maps)
        # Anchors made in inference mode cannot be saved for a later backward: keyed apart.
        key = (tuple(image_list.tensors.shape[-2:]), tuple(tuple(f.shape[-2:]) for f in feature_maps), first.device,
               first.dtype, torch.is_inference_mode_enabled())
        anchors = self._cache.get(key)
        if anchors is None:
            one_image = ImageList(image_list.tensors[:1], image_list.image_sizes[:1])
            anchors = super().forward(one_image, feature_maps)[0]
            self._cache[key] = anchors
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return [anchors] * len(image_list.image_sizes)


def _default_anchorgen() -> AnchorGenerator:
    """RetinaNet's anchors: three sizes per octave from 32 (P3) to 512 (P7), ratios 0.5, 1, 2."""
    anchor_sizes = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in [32, 64, 128, 256, 512])
    return AnchorGenerator(anchor_sizes, ((0.5, 1.0, 2.0),) * len(anchor_sizes))


def _fused_loss_applies(model) -> bool:
    """Whether the model's matcher, head losses and box coder are torchvision's, which the fused loss
    reproduces (a replaced one runs as torchvision runs it)."""
    head = model.head
    return (type(model.proposal_matcher) is det_utils.Matcher and type(model.box_coder) is det_utils.BoxCoder
            and isinstance(head, _TorchvisionHead) and type(head).compute_loss is _TorchvisionHead.compute_loss
            and type(head.classification_head) in (_TorchvisionClassificationHead, RetinaNetClassificationHead)
            and type(head.regression_head) in (_TorchvisionRegressionHead, RetinaNetRegressionHead)
            and isinstance(head.regression_head.box_coder, det_utils.BoxCoder))


def _resize_is_identity(transform, height: int, width: int) -> bool:
    """Whether GeneralizedRCNNTransform leaves a training image of height x width as it is (its bilinear
    resize to the same size returns the same values): it skips resizing, its fixed_size is that size, or its
    one min_size and max_size give a scale of 1."""
    if getattr(transform, "_skip_resize", False):
        return True
    if transform.fixed_size is not None:
        return (transform.fixed_size[1], transform.fixed_size[0]) == (height, width)
    if len(transform.min_size) != 1:
        raise ValueError("fastbb.models.detection.RetinaNet: static_shapes needs one min_size (the transform "
                         f"draws one of {transform.min_size} at every call)")
    return min(float(transform.min_size[0]) / min(height, width), float(transform.max_size) / max(height, width)) == 1.0


def _default_box_coder(coder) -> bool:
    """Whether coder is the BoxCoder the fused post-processing reproduces."""
    return type(coder) is det_utils.BoxCoder and coder.bbox_xform_clip == _DEFAULT_XFORM_CLIP and len(coder.weights) == 4


def _batched_loss(model, head_outputs, anchors, gt_boxes, gt_labels, gt_counts):
    """fastbb.ops.retinanet_loss with the model's matcher thresholds, box loss and box coder."""
    same_anchors = all(a is anchors[0] for a in anchors)
    regression_head = model.head.regression_head
    return retinanet_loss(
        head_outputs["cls_logits"], head_outputs["bbox_regression"],
        anchors[0] if same_anchors else torch.stack(anchors), gt_boxes, gt_labels, gt_counts,
        fg_iou_thresh=model.proposal_matcher.high_threshold, bg_iou_thresh=model.proposal_matcher.low_threshold,
        allow_low_quality_matches=model.proposal_matcher.allow_low_quality_matches,
        box_loss=regression_head._loss_type, box_coder_weights=tuple(regression_head.box_coder.weights),
        bbox_xform_clip=regression_head.box_coder.bbox_xform_clip)


class RetinaNet(_TorchvisionRetinaNet):
    """
    torchvision.models.detection.RetinaNet (same arguments, attributes, state_dict keys, outputs and errors;
    an instance of torchvision's class), with:

    - anchors from :class:`AnchorGenerator` (computed once per shape) when ``anchor_generator`` is not given;
    - the head from :class:`RetinaNetHead` (torchvision's weights and outputs, its large levels run
      channels_last in CPU inference) when ``head`` is not given;
    - the training loss of the whole batch at once (:func:`fastbb.ops.retinanet_loss`: torchvision's
      Matcher, sigmoid focal loss and box loss, normalised as torchvision does) when the matcher, head and
      box coder are torchvision's; a replaced one runs as torchvision runs it;
    - detections by :func:`fastbb.ops.retinanet_postprocess` (torchvision's postprocess_detections for the
      batch at once; equal scores rank by lower level and index first) while the box coder is the default.

    Build it with a fastbb backbone (:func:`retinanet_resnet50_fpn`) for the fused backbone and FPN.

    Args:
        backbone (nn.Module): the network computing the features; has ``out_channels``.
        num_classes (int): the number of output classes (including the background).
        min_size (int): the images' minimum size after GeneralizedRCNNTransform. Default: 800.
        max_size (int): the images' maximum size after the transform. Default: 1333.
        image_mean (Tuple[float, float, float]): normalisation mean. Default: ImageNet's.
        image_std (Tuple[float, float, float]): normalisation std. Default: ImageNet's.
        anchor_generator (AnchorGenerator, optional): torchvision's or fastbb's. Default: RetinaNet's anchors.
        head (nn.Module, optional): the classification and regression head. Default: fastbb's
            :class:`RetinaNetHead` (torchvision's, large levels channels_last in CPU inference).
        proposal_matcher (Matcher, optional): anchors to ground truth. Default: torchvision's Matcher with
            ``fg_iou_thresh``, ``bg_iou_thresh`` and low-quality matches.
        score_thresh (float): minimum class score of a detection. Default: 0.05.
        nms_thresh (float): NMS IoU threshold. Default: 0.5.
        detections_per_img (int): most detections per image. Default: 300.
        fg_iou_thresh (float): minimum IoU of a foreground anchor. Default: 0.5.
        bg_iou_thresh (float): maximum IoU of a background anchor. Default: 0.4.
        topk_candidates (int): candidates per level before NMS. Default: 1000.
        **kwargs: passed to GeneralizedRCNNTransform (``size_divisible``, ``fixed_size``, ...).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, min_size: int = 800, max_size: int = 1333,
                 image_mean: list[float] | None = None, image_std: list[float] | None = None,
                 anchor_generator: _TorchvisionAnchorGenerator | None = None, head: nn.Module | None = None,
                 proposal_matcher: det_utils.Matcher | None = None, score_thresh: float = 0.05,
                 nms_thresh: float = 0.5, detections_per_img: int = 300, fg_iou_thresh: float = 0.5,
                 bg_iou_thresh: float = 0.4, topk_candidates: int = 1000, static_shapes: bool = False,
                 **kwargs: Any) -> None:
        if anchor_generator is None and hasattr(backbone, "out_channels"):
            anchor_generator = _default_anchorgen()
        if head is None and hasattr(backbone, "out_channels") \
                and isinstance(anchor_generator, _TorchvisionAnchorGenerator):
            # torchvision's __init__ draws nothing random before it builds its head: built here, ours draws the
            # same numbers, so the same seed gives the same weights.
            head = RetinaNetHead(backbone.out_channels, anchor_generator.num_anchors_per_location()[0], num_classes)
        super().__init__(backbone, num_classes, min_size=min_size, max_size=max_size, image_mean=image_mean,
                         image_std=image_std, anchor_generator=anchor_generator, head=head,
                         proposal_matcher=proposal_matcher, score_thresh=score_thresh, nms_thresh=nms_thresh,
                         detections_per_img=detections_per_img, fg_iou_thresh=fg_iou_thresh,
                         bg_iou_thresh=bg_iou_thresh, topk_candidates=topk_candidates, **kwargs)
        self.static_shapes = static_shapes
        self._normalization: dict = {}  # (device, dtype) -> (mean, std) tensors, for the static-shape mode

    def forward(self, images: list[Tensor] | Tensor, targets: list[dict[str, Tensor]] | None = None
                ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """
        torchvision's RetinaNet.forward; in training with ``static_shapes`` set, the static-shape step (see
        :meth:`static_training_losses`).

        Args:
            images (List[Tensor[3, H, W]]): the images, values in [0, 1].
            targets (List[Dict[str, Tensor]], optional): in training, per image ``boxes`` (G, 4) x1y1x2y2 in
                pixels and ``labels`` (G,).

        Returns:
            Dict[str, Tensor] in training (``classification`` and ``bbox_regression`` losses), else per image
            ``boxes`` (D, 4), ``scores`` (D,) and ``labels`` (D,).
        """
        if self.training and self.static_shapes:
            return self.static_training_losses(images, targets)
        return super().forward(images, targets)

    def static_training_losses(self, images: list[Tensor] | Tensor, targets: list[dict[str, Tensor]] | None
                               ) -> dict[str, Tensor]:
        """
        The training losses without a host synchronisation, so that a whole training step (forward, backward,
        optimizer) can be captured in a CUDA graph. The same losses as :meth:`forward` for the same inputs;
        what differs is what it takes:

        - images of one size, the size GeneralizedRCNNTransform resizes them to (the transform's only
          ``min_size``, or its ``fixed_size``): they are normalised and padded as the transform does, not
          resized (torchvision's resize would create tensors from host values at every call);
        - targets of one shape: per image ``boxes`` (M, 4) and ``labels`` (M,) with the same M, rows with a
          negative label being padding (anywhere);
        - torchvision's check of boxes with non-positive width or height (which reads the boxes on the host)
          runs as ``torch._assert_async``: on CUDA a bad box fails the step asynchronously.

        Args:
            images (List[Tensor[3, H, W]] or Tensor[N, 3, H, W]): the images, at the transform's size.
            targets (List[Dict[str, Tensor]]): per image ``boxes`` (M, 4) and ``labels`` (M,).

        Returns:
            Dict[str, Tensor]: ``classification`` and ``bbox_regression`` losses.
        """
        torch._assert(targets is not None, "targets should not be none when in training mode")
        if not _fused_loss_applies(self):
            raise ValueError("fastbb.models.detection.RetinaNet: static_shapes needs torchvision's Matcher, "
                             "RetinaNetHead losses and BoxCoder (the ones the batched loss reproduces)")
        batch = images if isinstance(images, Tensor) else torch.stack(list(images))
        if batch.dim() != 4:
            raise ValueError(f"fastbb.models.detection.RetinaNet: static_shapes: images must be (N, 3, H, W) or a "
                             f"list of (3, H, W), got shape {tuple(batch.shape)}")
        height, width = batch.shape[-2:]
        if not _resize_is_identity(self.transform, height, width):
            raise ValueError(f"fastbb.models.detection.RetinaNet: static_shapes: images must already have the size "
                             f"the transform resizes them to (min_size {self.transform.min_size}, max_size "
                             f"{self.transform.max_size}, fixed_size {self.transform.fixed_size}), got {height}x{width}")
        key = (batch.device, batch.dtype)
        if key not in self._normalization:
            self._normalization[key] = tuple(torch.as_tensor(v, dtype=batch.dtype, device=batch.device)[:, None, None]
                                             for v in (self.transform.image_mean, self.transform.image_std))
        mean, std = self._normalization[key]
        batch = (batch - mean) / std
        divisor = self.transform.size_divisible
        pad_h, pad_w = (-height) % divisor, (-width) % divisor
        if pad_h or pad_w:
            batch = torch.nn.functional.pad(batch, (0, pad_w, 0, pad_h))
        image_list = ImageList(batch, [(height, width)] * batch.shape[0])
        gt_boxes = torch.stack([t["boxes"] for t in targets])
        gt_labels = torch.stack([t["labels"] for t in targets]).long()
        valid = gt_labels >= 0
        torch._assert_async((~valid | (gt_boxes[..., 2:] > gt_boxes[..., :2]).all(-1)).all(),
                            "All bounding boxes should have positive height and width.")
        # The loss takes each image's boxes first and its count: valid rows moved to the front, in order.
        order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices
        gt_boxes = gt_boxes.gather(1, order[..., None].expand_as(gt_boxes))
        gt_labels = gt_labels.gather(1, order)
        gt_counts = valid.sum(1)
        features = self.backbone(batch)
        features = [features] if isinstance(features, Tensor) else list(features.values())
        head_outputs = self.head(features)
        anchors = self.anchor_generator(image_list, features)
        return _batched_loss(self, head_outputs, anchors, gt_boxes, gt_labels, gt_counts)

    def compute_loss(self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor],
                     anchors: list[Tensor]) -> dict[str, Tensor]:
        """
        torchvision's RetinaNet.compute_loss, for the whole batch at once.

        Args:
            targets (List[Dict[str, Tensor]]): per image ``boxes`` (G, 4) and ``labels`` (G,).
            head_outputs (Dict[str, Tensor]): ``cls_logits`` (N, A, K) and ``bbox_regression`` (N, A, 4).
            anchors (List[Tensor[A, 4]]): the anchors of each image.

        Returns:
            Dict[str, Tensor]: ``classification`` and ``bbox_regression`` losses.
        """
        if not _fused_loss_applies(self):
            # (named, not super(): fastbb.convert binds this method to torchvision's own RetinaNet instances)
            return _TorchvisionRetinaNet.compute_loss(self, targets, head_outputs, anchors)
        return _batched_loss(self, head_outputs, anchors, *pad_targets(targets))

    def postprocess_detections(self, head_outputs: dict[str, list[Tensor]], anchors: list[list[Tensor]],
                               image_shapes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """
        torchvision's RetinaNet.postprocess_detections, for the whole batch at once.

        Args:
            head_outputs (Dict[str, List[Tensor]]): ``cls_logits`` and ``bbox_regression``, split per level.
            anchors (List[List[Tensor]]): per image, its anchors split per level.
            image_shapes (List[Tuple[int, int]]): (h, w) of each image.

        Returns:
            List[Dict[str, Tensor]]: per image ``boxes`` (D, 4), ``scores`` (D,) and ``labels`` (D,).
        """
        if not _default_box_coder(self.box_coder) or not anchors:
            return _TorchvisionRetinaNet.postprocess_detections(self, head_outputs, anchors, image_shapes)
        num_anchors_per_level = [t.shape[1] for t in head_outputs["cls_logits"]]
        return retinanet_postprocess(
            torch.cat(head_outputs["cls_logits"], dim=1), torch.cat(head_outputs["bbox_regression"], dim=1),
            [torch.cat(per_image) for per_image in anchors], num_anchors_per_level, image_shapes,
            self.score_thresh, self.nms_thresh, self.detections_per_img, self.topk_candidates,
            tuple(self.box_coder.weights))


def _detection_state_dict(builder: str, weights: Any, weights_enum: type[enum.Enum], progress: bool):
    """(state_dict or None, the enum member or None) of a detection builder's ``weights``: a member or name of
    torchvision's enum (loaded through its weights API), a state_dict, or the path of a file holding one."""
    if weights is None or isinstance(weights, Mapping):
        return weights, None
    if isinstance(weights, os.PathLike) or (isinstance(weights, str) and weights not in weights_enum.__members__
                                            and not weights.startswith(f"{weights_enum.__name__}.")
                                            and os.path.isfile(weights)):
        return torch.load(weights, map_location="cpu", weights_only=True), None
    try:
        member = weights_enum.verify(weights)
    except (KeyError, TypeError, ValueError) as error:
        raise type(error)(f"fastbb.models.detection.{builder}: weights: {error}") from None
    return None, member


def _set_frozen_eps(model: nn.Module, eps: float) -> None:
    """torchvision's overwrite_eps for fastbb's FrozenBatchNorm2d (and torchvision's)."""
    for module in model.modules():
        if type(module).__name__ == "FrozenBatchNorm2d":
            module.eps = eps


_BUILDER_ARGS = """
    Args:
        weights ({enum} or str or dict[str, Tensor] or os.PathLike, optional): torchvision's pretrained
            weights (a member of ``{enum}`` or its name, ``"DEFAULT"``, loaded through torchvision's weights
            API), a state_dict with torchvision's keys, or the path of a file holding one. Default: None.
        progress (bool): whether a download shows a progress bar. Default: True.
        num_classes (int, optional): classes including the background. Default: 91 (the weights' categories).
        weights_backbone (ResNet50_Weights or str, optional): the backbone's pretrained weights.
            Default: ResNet50_Weights.IMAGENET1K_V1, as torchvision.
        trainable_backbone_layers (int, optional): trainable stages counted from the last, in [0, 5].
            Default: 3 with pretrained weights, else 5.
        **kwargs: passed to :class:`RetinaNet` (``min_size``, ``max_size``, ``score_thresh``,
            ``nms_thresh``, ``detections_per_img``, ``fg_iou_thresh``, ``bg_iou_thresh``,
            ``topk_candidates``, ...). torchvision's deprecated ``pretrained`` / ``pretrained_backbone`` work too.

    Returns:
        RetinaNet: the model.
"""


def _legacy_argument(builder: str, name: str, value: Any, legacy_name: str, pretrained: enum.Enum,
                     kwargs: dict[str, Any]) -> Any:
    """torchvision's deprecated forms, with its deprecation warning: ``pretrained`` / ``pretrained_backbone``
    (popped from kwargs; they win over ``weights`` / ``weights_backbone`` as in torchvision) and a boolean
    ``weights`` / ``weights_backbone`` stand for the first weights or None. Any other value is returned as it is
    (torchvision's own decorator would also take a state_dict for ``pretrained=True``)."""
    if legacy_name in kwargs:
        flag, given = kwargs.pop(legacy_name), legacy_name
    elif isinstance(value, bool):
        flag, given = value, name
    else:
        return value
    equivalent = f"{name}={type(pretrained).__name__}.{pretrained.name}" if flag else f"{name}=None"
    warnings.warn(f"fastbb.models.detection.{builder}: {given}={flag!r} is deprecated (as in torchvision since "
                  f"0.13); it is equivalent to {equivalent}", UserWarning, stacklevel=4)
    return pretrained if flag else None


def _retinanet(builder: str, weights: Any, weights_enum: type[enum.Enum], progress: bool,
               num_classes: int | None, weights_backbone: Any, trainable_backbone_layers: int | None,
               version: int, **kwargs: Any) -> RetinaNet:
    weights = _legacy_argument(builder, "weights", weights, "pretrained", weights_enum.COCO_V1, kwargs)
    weights_backbone = _legacy_argument(builder, "weights_backbone", weights_backbone, "pretrained_backbone",
                                        ResNet50_Weights.IMAGENET1K_V1, kwargs)
    state_dict, member = _detection_state_dict(builder, weights, weights_enum, progress)
    weights_backbone = ResNet50_Weights.verify(weights_backbone)
    if member is not None:
        num_classes = _ovewrite_value_param("num_classes", num_classes, len(member.meta["categories"]))
    elif num_classes is None:
        num_classes = 91
    if member is not None or state_dict is not None:
        weights_backbone = None
    is_trained = member is not None or state_dict is not None or weights_backbone is not None
    trainable_backbone_layers = _validate_trainable_layers(is_trained, trainable_backbone_layers, 5, 3)
    # The same construction order as torchvision's builders, so the same seed gives the same weights.
    if version == 1:
        norm_layer = FrozenBatchNorm2d if is_trained else nn.BatchNorm2d
        backbone = resnet50(weights=weights_backbone, progress=progress, norm_layer=norm_layer)
        backbone = resnet_fpn_extractor(backbone, trainable_backbone_layers, returned_layers=[2, 3, 4],
                                        extra_blocks=LastLevelP6P7(256, 256))
        model = RetinaNet(backbone, num_classes, **kwargs)
    else:
        backbone = resnet50(weights=weights_backbone, progress=progress)
        backbone = resnet_fpn_extractor(backbone, trainable_backbone_layers, returned_layers=[2, 3, 4],
                                        extra_blocks=LastLevelP6P7(2048, 256))
        anchor_generator = _default_anchorgen()
        head = RetinaNetHead(backbone.out_channels, anchor_generator.num_anchors_per_location()[0], num_classes,
                             norm_layer=partial(nn.GroupNorm, 32))
        head.regression_head._loss_type = "giou"
        model = RetinaNet(backbone, num_classes, anchor_generator=anchor_generator, head=head, **kwargs)
    if member is not None:
        state_dict = member.get_state_dict(progress=progress, check_hash=True)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    if member == RetinaNet_ResNet50_FPN_Weights.COCO_V1:
        _set_frozen_eps(model, 0.0)
    return model


def retinanet_resnet50_fpn(*, weights: Any = None, progress: bool = True, num_classes: int | None = None,
                           weights_backbone: Any = ResNet50_Weights.IMAGENET1K_V1,
                           trainable_backbone_layers: int | None = None, **kwargs: Any) -> RetinaNet:
    """torchvision's RetinaNet ResNet-50 FPN (`Focal Loss for Dense Object Detection
    <https://arxiv.org/abs/1708.02002>`_), fused: torchvision.models.detection.retinanet_resnet50_fpn's
    arguments, weights and state_dict keys.
    """
    return _retinanet("retinanet_resnet50_fpn", weights, RetinaNet_ResNet50_FPN_Weights, progress, num_classes,
                      weights_backbone, trainable_backbone_layers, 1, **kwargs)


def retinanet_resnet50_fpn_v2(*, weights: Any = None, progress: bool = True, num_classes: int | None = None,
                              weights_backbone: Any = None, trainable_backbone_layers: int | None = None,
                              **kwargs: Any) -> RetinaNet:
    """torchvision's improved RetinaNet ResNet-50 FPN (`Bridging the Gap Between Anchor-based and Anchor-free
    Detection <https://arxiv.org/abs/1912.02424>`_: GroupNorm head, GIoU box loss), fused:
    torchvision.models.detection.retinanet_resnet50_fpn_v2's arguments, weights and state_dict keys.
    """
    return _retinanet("retinanet_resnet50_fpn_v2", weights, RetinaNet_ResNet50_FPN_V2_Weights, progress,
                      num_classes, weights_backbone, trainable_backbone_layers, 2, **kwargs)


for _builder, _enum in ((retinanet_resnet50_fpn, "RetinaNet_ResNet50_FPN_Weights"),
                        (retinanet_resnet50_fpn_v2, "RetinaNet_ResNet50_FPN_V2_Weights")):
    if _builder.__doc__ is not None:  # None under python -OO
        _builder.__doc__ += _BUILDER_ARGS.format(enum=_enum)
