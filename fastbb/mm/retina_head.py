"""mmdet's RetinaHead, fused: registered as 'RetinaHead' for the mmdet scope (needs mmdet installed).

A subclass of mmdet's own RetinaHead, so its arguments, state_dict keys (``cls_convs.N.conv``,
``reg_convs.N.conv``, ``retina_cls``, ``retina_reg``), initialisation (the prior bias of ``retina_cls``),
anchors, target assignment and losses are mmdet's. What runs differently:
- forward: each branch's stacked convs and output conv through fastbb's conv tables (fastbb.nn.conv_layers:
  a conv and its ReLU as one call; in training the small levels share one canvas per conv), where the
  ConvModules are plain (conv then ReLU, no norm, no hooks) and the computation is eager float32 on the
  CPU; else mmdet's forward.
- predict: the per-level candidates by one top-k over the logits (sigmoid is increasing, so the top
  logits are the top scores) where mmdet sorts every score above the threshold (2.9M at P3 of a 512x512
  image), the sigmoid of the candidates only, and the NMS by fastbb.ops.batched_nms where the nms config is
  plain NMS; the rest (decoding, rescaling, min_bbox_size) is mmdet's.
- loss: mmdet's loss_by_feat, whose FocalLoss and DeltaXYWHBBoxCoder are fastbb's where fastbb.mm replaced
  them in mmdet's registry.
"""
import torch
from mmdet.models.dense_heads.retina_head import RetinaHead as _MMDetRetinaHead
from torch import nn

from fastbb._registry import register
from fastbb.nn.conv_layers import _has_hooks, levels_forward, runs_fused_convs
from fastbb.ops.nms import batched_nms

__all__ = ["RetinaHead"]

# nms configs run by fastbb.ops.batched_nms: plain NMS per label (mmcv's batched_nms with type 'nms' and no
# options but the threshold; split_thr only picks between two ways of computing the same result)
_PLAIN_NMS_KEYS = {"type", "iou_threshold", "split_thr", "offset"}


def _plain_conv_relu(module):
    """The (conv, ReLU) an mmcv ConvModule runs, when it is just that: a plain Conv2d then a ReLU, no norm, no
    explicit padding layer, no hooks; else None."""
    if (_has_hooks(module) or getattr(module, "with_norm", True) or getattr(module, "with_explicit_padding", True)
            or not getattr(module, "with_activation", False) or type(module.activate) is not nn.ReLU
            or tuple(module.order) != ("conv", "norm", "act") or type(module.conv) is not nn.Conv2d):
        return None
    return module.conv, module.activate


def _branch(convs):
    """A branch's stacked ConvModules as an nn.Sequential of (Conv2d, ReLU) pairs sharing their modules (what
    fastbb.nn.conv_layers runs), or None when one of them is not a plain conv + ReLU."""
    pairs = [_plain_conv_relu(module) for module in convs]
    if any(pair is None for pair in pairs):
        return None
    return nn.Sequential(*(nn.Sequential(*pair) for pair in pairs))


def _plain_nms(nms_cfg):
    """The IoU threshold when nms_cfg is plain NMS per label with offset 0, else None."""
    if nms_cfg is None or not set(nms_cfg) <= _PLAIN_NMS_KEYS or nms_cfg.get("type", "nms") != "nms":
        return None
    if nms_cfg.get("offset", 0) != 0 or "iou_threshold" not in nms_cfg:
        return None
    return float(nms_cfg["iou_threshold"])


@register("RetinaHead", scopes=("mmdet",))
class RetinaHead(_MMDetRetinaHead):
    """
    mmdet's ``RetinaHead`` (same arguments, keys, initialisation and losses) with its convs and its
    post-processing fused (see the module docstring). Built by mmdet's registry where ``fastbb.mm`` is
    imported.
    """

    def forward(self, x):
        """
        Args:
            x (Tuple[Tensor[N, C, H, W]]): the features of each level.

        Returns:
            (List[Tensor], List[Tensor]): each level's class logits (N, A * num_classes, H, W) and box deltas
            (N, A * 4, H, W), as mmdet's ``RetinaHead.forward``.
        """
        features = list(x)
        if _has_hooks(self.retina_cls) or _has_hooks(self.retina_reg) or not runs_fused_convs(features):
            return super().forward(x)
        cls_branch, reg_branch = _branch(self.cls_convs), _branch(self.reg_convs)
        if cls_branch is None or reg_branch is None:
            return super().forward(x)
        return (levels_forward(cls_branch, self.retina_cls, features),
                levels_forward(reg_branch, self.retina_reg, features))

    def _predict_by_feat_single(self, cls_score_list, bbox_pred_list, score_factor_list, mlvl_priors, img_meta,
                                cfg, rescale=False, with_nms=True):
        cfg = self.test_cfg if cfg is None else cfg
        nms_pre = cfg.get("nms_pre", -1)
        if (score_factor_list[0] is not None or not self.use_sigmoid_cls or nms_pre <= 0
                or getattr(self.loss_cls, "custom_cls_channels", False)):
            return super()._predict_by_feat_single(cls_score_list, bbox_pred_list, score_factor_list, mlvl_priors,
                                                   img_meta, cfg, rescale=rescale, with_nms=with_nms)
        from mmengine.structures import InstanceData
        score_thr = cfg.get("score_thr", 0)
        num_classes = self.cls_out_channels
        box_dim = self.bbox_coder.encode_size
        deltas, priors, scores, labels = [], [], [], []
        for cls_score, bbox_pred, level_priors in zip(cls_score_list, bbox_pred_list, mlvl_priors):
            if cls_score.shape[-2:] != bbox_pred.shape[-2:]:
                raise AssertionError(f"RetinaHead: a level's cls_score {tuple(cls_score.shape)} and bbox_pred "
                                     f"{tuple(bbox_pred.shape)} differ in size")
            positions = cls_score.shape[-2] * cls_score.shape[-1]
            num_anchors = cls_score.shape[0] // num_classes
            # mmdet ranks (position, anchor, class) rows; here the logits keep their (anchor, class, position)
            # layout and the chosen indices are mapped to mmdet's order afterwards
            logits = cls_score.reshape(-1)
            top_logits, top = logits.topk(min(nms_pre, logits.numel()))
            top_scores = top_logits.sigmoid()
            keep = top_scores > score_thr
            top_scores, top = top_scores[keep], top[keep]
            anchor_class, position = top // positions, top % positions
            anchor, label = anchor_class // num_classes, anchor_class % num_classes
            prior_index = position * num_anchors + anchor
            # mmdet's sort puts equal scores in its row order: sort by that first, then stably by score
            order = (prior_index * num_classes + label).argsort()
            order = order[top_scores[order].argsort(descending=True, stable=True)]
            prior_index, anchor, position, label = (prior_index[order], anchor[order], position[order],
                                                    label[order])
            scores.append(top_scores[order])
            labels.append(label)
            priors.append(level_priors[prior_index])
            deltas.append(bbox_pred.reshape(num_anchors, box_dim, positions)[anchor, :, position])
        results = InstanceData()
        results.bboxes = self.bbox_coder.decode(torch.cat(priors), torch.cat(deltas), max_shape=img_meta["img_shape"])
        results.scores = torch.cat(scores)
        results.labels = torch.cat(labels)
        return self._bbox_post_process(results=results, cfg=cfg, rescale=rescale, with_nms=with_nms,
                                       img_meta=img_meta)

    def _bbox_post_process(self, results, cfg, rescale=False, with_nms=True, img_meta=None):
        iou_threshold = _plain_nms(cfg.get("nms")) if with_nms else None
        if iou_threshold is None or cfg.get("max_per_img") is None:
            return super()._bbox_post_process(results, cfg, rescale=rescale, with_nms=with_nms, img_meta=img_meta)
        # mmdet's rescaling and size filter, then plain NMS per label, then the first max_per_img
        results = super()._bbox_post_process(results, cfg, rescale=rescale, with_nms=False, img_meta=img_meta)
        if results.bboxes.numel() > 0:
            keep = batched_nms(results.bboxes, results.scores, results.labels, iou_threshold)
            results = results[keep][:cfg.max_per_img]
        return results
