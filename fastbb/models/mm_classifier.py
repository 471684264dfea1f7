"""mmpretrain's image classifier (``ImageClassifier`` with ``GlobalAveragePooling``, ``LinearClsHead`` and
``CrossEntropyLoss``), so that ``fastbb.build(cfg, scope="mmpretrain")`` builds an mmpretrain classification
config, fused backbone included, with or without mmpretrain installed::

    model = fastbb.build(dict(
        type="ImageClassifier",
        backbone=dict(type="ResNet", depth=50, num_stages=4, out_indices=(3,), style="pytorch"),
        neck=dict(type="GlobalAveragePooling"),
        head=dict(type="LinearClsHead", num_classes=1000, in_channels=2048,
                  loss=dict(type="CrossEntropyLoss", loss_weight=1.0), topk=(1, 5))), scope="mmpretrain")
    losses = model(images, labels, mode="loss")        # {'loss': tensor}
    results = model(images, mode="predict")            # per image: pred_score, pred_label

Same constructor arguments, state_dict keys (``backbone.*``, ``head.fc.weight``, ``head.fc.bias``) and
results as mmpretrain's. The fusion is in the backbone; the neck, head and loss are plain PyTorch: they
would bring nothing fused into mmpretrain, so ``import fastbb.mm`` leaves its own classes in its registry.

Labels (``data_samples``) are mmpretrain ``DataSample`` objects or anything with a ``gt_label`` (or
``gt_score``) attribute, or a tensor: (N,) class indices or (N, C) target scores. ``predict`` returns
mmpretrain ``DataSample`` objects where mmpretrain is installed (the given ones, filled in), else
:class:`ClsPrediction` objects, which have the same fields.

As in OpenMMLab, construction leaves PyTorch's default initialisation (the modules are built in mmpretrain's
order, so the same seed gives the same weights) and ``init_weights()`` applies each ``init_cfg``: the head's
Normal init, the backbone's, and a ``Pretrained`` checkpoint of the whole model last.

These are plain ``nn.Module`` objects, for PyTorch training loops. mmengine's Runner drives mmpretrain's own
ImageClassifier (its ``train_step`` runs the data preprocessor), whose backbone ``import fastbb.mm`` makes
fastbb's.
"""
import copy
import dataclasses
import functools
import importlib
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastbb._registry import build, register, registered
from fastbb.models.mm_resnet import _init_cfgs, _is_pretrained, _load_local_checkpoint
from fastbb.ops._common import ValueAssertionError

SCOPE = "mmpretrain"
_REDUCTIONS = ("none", "mean", "sum")
_STAGES = ("backbone", "neck", "pre_logits")


def _mmpretrain(module):
    """mmpretrain's `module` (e.g. 'registry'), or None where mmpretrain is not installed."""
    try:
        importlib.import_module("mmpretrain")
        return importlib.import_module(f"mmpretrain.{module}")
    except ImportError:
        return None


def _build_with_mmpretrain(registry, cfg):
    # '_scope_' makes mmengine build from mmpretrain's registry whatever default scope is current.
    return registry.MODELS.build({"_scope_": SCOPE, **cfg})


def _build_part(owner, role, cfg):
    """A sub-module an mmpretrain config names: fastbb's class of the type, or, for a type fastbb has no class
    for, mmpretrain's own where it is installed (the original, unfused: a valid config still works)."""
    if isinstance(cfg, nn.Module):
        return cfg
    if not isinstance(cfg, dict):
        raise TypeError(f"{owner}: {role} must be a config dict or an nn.Module, got {type(cfg).__name__}")
    type_name = cfg.get("type")
    if isinstance(type_name, str) and type_name not in registered(SCOPE):
        registry = _mmpretrain("registry")
        if registry is None:
            raise KeyError(f"{owner}: {role} type {type_name!r} has no fastbb class in scope {SCOPE!r} (fastbb has "
                           f"{registered(SCOPE)}), and mmpretrain, which has its own, is not installed")
        return _build_with_mmpretrain(registry, cfg)
    return build(cfg, scope=SCOPE)


def _weight_init():
    """mmengine's initialisers (mmengine.model.weight_init), or None where mmengine is not installed."""
    try:
        return importlib.import_module("mmengine.model.weight_init")
    except ImportError:
        return None


def _native_normal(cfg):
    """(layer types, mean, std, bias) of a Normal init_cfg fastbb applies itself (the keys mmpretrain's heads
    use), else None."""
    keys = {"type", "layer", "mean", "std", "bias"}
    if not isinstance(cfg, dict) or cfg.get("type") != "Normal" or set(cfg) - keys:
        return None
    layers = cfg.get("layer")
    layers = [layers] if isinstance(layers, str) else list(layers or [])
    return layers, cfg.get("mean", 0.0), cfg.get("std", 1.0), cfg.get("bias", 0.0)


def _check_init_cfg(owner, init_cfg):
    """Without mmengine fastbb applies Normal inits and local Pretrained checkpoints itself; other initialisers
    are mmengine's."""
    for cfg in _init_cfgs(init_cfg):
        if not isinstance(cfg, dict) or "type" not in cfg:
            raise TypeError(f"{owner}: init_cfg must be a dict with a 'type' key or a list of them, got {init_cfg!r}")
        if _native_normal(cfg) is None and not _is_pretrained(cfg) and _weight_init() is None:
            raise ValueError(f"{owner}: init_cfg {cfg!r} needs mmengine's initialisers, and mmengine is not installed "
                             f"(fastbb applies Normal inits and local Pretrained checkpoints itself)")


def _normal_init(layers, mean, std, bias, m):
    # mmengine matches a layer type by the module's class name or the names of its direct bases
    if {type(m).__name__, *(b.__name__ for b in type(m).__bases__)} & set(layers):
        if getattr(m, "weight", None) is not None:
            nn.init.normal_(m.weight, mean, std)
        if getattr(m, "bias", None) is not None:
            nn.init.constant_(m.bias, bias)


def _initialize(owner, module, cfgs):
    """Applies init_cfgs to module as mmengine does: a Normal init of the layer types it names (in
    module.apply's order: the random numbers mmengine draws), others by mmengine, or a local checkpoint
    without it."""
    for cfg in cfgs:
        normal = _native_normal(cfg)
        if normal is not None:
            module.apply(functools.partial(_normal_init, *normal))
        elif _weight_init() is not None:
            _weight_init().initialize(module, copy.deepcopy(cfg))
        else:  # only a Pretrained checkpoint gets here (_check_init_cfg)
            _load_local_checkpoint(owner, module, cfg)


class _InitOnce:
    """mmengine's BaseModule contract for init_weights: it runs once (a second call warns and does nothing),
    and ``is_init`` says whether it ran (a parent skips children whose init ran)."""
    is_init = False

    def _first_init(self, owner):
        if self.is_init:
            warnings.warn(f"{owner}: init_weights has been called more than once; the second call does nothing",
                          stacklevel=3)
            return False
        self.is_init = True
        return True


@dataclasses.dataclass
class ClsPrediction:
    """
    One image's classification result where mmpretrain (whose ``DataSample`` holds it there) is not installed:
    the fields and setters of ``DataSample`` that :meth:`ClsHead.predict` fills in.

    Args:
        pred_score (Tensor[C], optional): the softmax of the class scores.
        pred_label (Tensor[1], optional): the class with the highest score (int64).
        gt_label (Tensor[1], optional): the label given with the image (int64).
        gt_score (Tensor[C], optional): the target scores given with the image.
    """
    pred_score: Tensor | None = None
    pred_label: Tensor | None = None
    gt_label: Tensor | None = None
    gt_score: Tensor | None = None

    def set_pred_score(self, value: Tensor) -> "ClsPrediction":
        """
        Args:
            value (Tensor[C]): the predicted scores.

        Returns:
            ClsPrediction: self.
        """
        self.pred_score = value
        return self

    def set_pred_label(self, value: Tensor | int) -> "ClsPrediction":
        """
        Args:
            value (Tensor | int): the predicted class, kept as a (1,) tensor.

        Returns:
            ClsPrediction: self.
        """
        self.pred_label = torch.as_tensor(value).reshape(-1)
        return self

    def set_gt_label(self, value: Tensor | int) -> "ClsPrediction":
        """
        Args:
            value (Tensor | int): the true class, kept as a (1,) tensor.

        Returns:
            ClsPrediction: self.
        """
        self.gt_label = torch.as_tensor(value).reshape(-1)
        return self

    def set_gt_score(self, value: Tensor) -> "ClsPrediction":
        """
        Args:
            value (Tensor[C]): the target scores.

        Returns:
            ClsPrediction: self.
        """
        self.gt_score = value
        return self


def _reduce(loss, reduction, avg_factor):
    """mmpretrain's reduction: with an avg_factor (ClsHead passes the batch size), 'mean' is the sum over it."""
    if avg_factor is None:
        return loss if reduction == "none" else loss.mean() if reduction == "mean" else loss.sum()
    if reduction == "mean":
        return loss.sum() / avg_factor
    if reduction == "sum":
        raise ValueError('fastbb.models.CrossEntropyLoss: avg_factor can not be used with reduction="sum"')
    return loss


@register("CrossEntropyLoss", scopes=(SCOPE,), replaces_original=False)
class CrossEntropyLoss(nn.Module):
    """
    mmpretrain's ``CrossEntropyLoss``: softmax cross entropy on class indices or target scores, soft cross
    entropy (``use_soft``), or binary cross entropy on logits (``use_sigmoid``).

    Args:
        use_sigmoid (bool): binary cross entropy of each class's sigmoid (labels (N, C): 0/1 or soft targets).
            Default: False.
        use_soft (bool): the soft cross entropy -sum(label * log_softmax(score)) (labels (N, C): scores).
            Default: False.
        reduction (str): 'none', 'mean' or 'sum'. Default: 'mean'.
        loss_weight (float): the factor the loss is multiplied by. Default: 1.0.
        class_weight (Sequence[float], optional): a weight per class. Default: None.
        pos_weight (Sequence[float], optional): the weight of the positive term per class, with use_sigmoid
            (ignored otherwise, as in mmpretrain). Default: None.
    """

    def __init__(self, use_sigmoid: bool = False, use_soft: bool = False, reduction: str = "mean",
                 loss_weight: float = 1.0, class_weight: Sequence[float] | None = None,
                 pos_weight: Sequence[float] | None = None) -> None:
        super().__init__()
        name = "fastbb.models.CrossEntropyLoss"
        if use_sigmoid and use_soft:
            raise ValueAssertionError(f"{name}: use_sigmoid and use_soft cannot both be set")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"{name}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.use_sigmoid = use_sigmoid
        self.use_soft = use_soft
        self.reduction = reduction
        self.loss_weight = loss_weight
        self.class_weight = class_weight
        self.pos_weight = pos_weight

    def forward(self, cls_score: Tensor, label: Tensor, weight: Tensor | None = None,
                avg_factor: float | None = None, reduction_override: str | None = None, **kwargs: Any) -> Tensor:
        """
        Args:
            cls_score (Tensor[N, C]): the class scores (logits).
            label (Tensor): (N,) class indices or (N, C) target scores; (N, C) with use_sigmoid or use_soft.
            weight (Tensor[N], optional): a weight per sample. Default: None.
            avg_factor (float, optional): with reduction 'mean', the divisor of the summed loss. Default: None.
            reduction_override (str, optional): 'none', 'mean' or 'sum' in place of ``reduction``.
            **kwargs: none are accepted (mmpretrain passes them on to its loss functions, which take none
                either): one raises a TypeError naming it.

        Returns:
            Tensor: the loss, reduced as asked, times loss_weight.
        """
        name = "fastbb.models.CrossEntropyLoss"
        if kwargs:
            raise TypeError(f"{name}: unexpected keyword argument(s) {sorted(kwargs)}")
        if reduction_override not in (None, *_REDUCTIONS):
            raise ValueAssertionError(f"{name}: reduction_override must be None or one of {_REDUCTIONS}, got "
                                      f"{reduction_override!r}")
        reduction = reduction_override or self.reduction
        class_weight = None if self.class_weight is None else cls_score.new_tensor(self.class_weight)
        if self.use_sigmoid:
            if cls_score.dim() != label.dim():
                raise ValueAssertionError(f"{name}: with use_sigmoid, label must have the dimensions of cls_score "
                                          f"{tuple(cls_score.shape)} (one-hot or soft targets), got "
                                          f"{tuple(label.shape)}")
            pos_weight = None if self.pos_weight is None else cls_score.new_tensor(self.pos_weight)
            # class_weight (C,) broadcasts over the batch: a weight per element
            loss = F.binary_cross_entropy_with_logits(cls_score, label.to(cls_score.dtype), weight=class_weight,
                                                      pos_weight=pos_weight, reduction="none")
            if weight is not None and cls_score.dim() > 1:
                if weight.dim() != 1:
                    raise ValueAssertionError(f"{name}: weight must have one entry per sample (N,), got "
                                              f"{tuple(weight.shape)}")
                weight = weight.reshape(-1, 1)
        elif self.use_soft:
            loss = -label * F.log_softmax(cls_score, dim=-1)
            if class_weight is not None:
                loss = loss * class_weight
            loss = loss.sum(dim=-1)
        else:
            loss = F.cross_entropy(cls_score, label, weight=class_weight, reduction="none")
        if weight is not None:
            loss = loss * weight.float()
        return self.loss_weight * _reduce(loss, reduction, avg_factor)


def _topk_accuracy(cls_score, target, topk):
    """mmpretrain's training accuracy (its Accuracy metric at threshold 0): per k, a list of one (1,) tensor, the
    percentage of samples whose label is among the k highest scores with a score above 0 (raw scores, so a
    right class whose logit is negative does not count)."""
    maxk = max(topk)
    if maxk > cls_score.size(1):
        raise ValueError(f"fastbb.models.ClsHead: Top-{maxk} accuracy is unavailable since the number of "
                         f"categories is {cls_score.size(1)}.")
    scores, labels = cls_score.detach().float().topk(maxk, dim=1)
    hits = (labels == target.view(-1, 1).long()) & (scores > 0)
    return [[hits[:, :k].reshape(-1).float().sum(0, keepdim=True) * (100.0 / cls_score.size(0))] for k in topk]


def _loss_target(owner, data_samples, cls_score):
    """The loss target the labels give: (N,) class indices or (N, C) scores."""
    if data_samples is None:
        raise ValueError(f"{owner}: data_samples (the labels: data samples with gt_label, or a label tensor) are "
                         f"required for the loss")
    if isinstance(data_samples, Tensor):
        target = data_samples
    else:
        samples = list(data_samples)
        if not samples or not all(hasattr(s, "gt_label") or hasattr(s, "gt_score") for s in samples):
            raise TypeError(f"{owner}: data_samples must be a label tensor or data samples with a gt_label (or "
                            f"gt_score), got {data_samples!r}")
        # Batch augmentations (Mixup, CutMix) replace the labels by target scores: those win, as in mmpretrain.
        if getattr(samples[0], "gt_score", None) is not None:
            target = torch.stack([s.gt_score for s in samples])
        else:
            target = torch.cat([torch.as_tensor(s.gt_label).reshape(-1) for s in samples])
    if target.dim() == 0 or target.size(0) != cls_score.size(0):
        raise ValueError(f"{owner}: data_samples give labels of shape {tuple(target.shape)} for "
                         f"{cls_score.size(0)} images")
    return target.to(cls_score.device)


def _result_samples(owner, data_samples, count):
    """The objects predict fills in: the given data samples, and for each image without one a new one
    (mmpretrain's DataSample where installed, else ClsPrediction) holding the given label tensor's row."""
    structures = _mmpretrain("structures")
    new = ClsPrediction if structures is None else structures.DataSample
    if data_samples is None:
        return [new() for _ in range(count)]
    if isinstance(data_samples, Tensor):
        if data_samples.dim() not in (1, 2) or data_samples.size(0) != count:
            raise ValueError(f"{owner}: data_samples labels of shape {tuple(data_samples.shape)} for {count} images; "
                             f"expected ({count},) class indices or ({count}, C) scores")
        if data_samples.dim() == 1:
            return [new().set_gt_label(label.reshape(1)) for label in data_samples]
        return [new().set_gt_score(score) for score in data_samples]
    samples = list(data_samples)
    if len(samples) != count:
        raise ValueError(f"{owner}: {len(samples)} data_samples for {count} images")
    return [new() if s is None else s for s in samples]


@register("ClsHead", scopes=(SCOPE,), replaces_original=False)
class ClsHead(_InitOnce, nn.Module):
    """
    mmpretrain's ``ClsHead``: the loss and the predictions on the last feature, taken as the class scores.

    Args:
        loss (dict | nn.Module): the classification loss. Default: dict(type='CrossEntropyLoss',
            loss_weight=1.0).
        topk (int | Tuple[int]): the top-k accuracies cal_acc adds. Default: (1,).
        cal_acc (bool): whether :meth:`loss` adds 'accuracy_top-K' entries (pointless with batch augmentations
            such as Mixup, whose target scores raise). Default: False.
        init_cfg (dict | List[dict], optional): what :meth:`init_weights` applies: Normal inits fastbb applies
            itself, other initialisers need mmengine. Default: None.
    """

    def __init__(self, loss: dict | nn.Module = dict(type="CrossEntropyLoss", loss_weight=1.0),
                 topk: int | tuple[int, ...] = (1,), cal_acc: bool = False, init_cfg: dict | None = None) -> None:
        super().__init__()
        name = f"fastbb.models.{type(self).__name__}"
        _check_init_cfg(name, init_cfg)
        self.init_cfg = copy.deepcopy(init_cfg)
        self.topk = topk
        self.loss_module = _build_part(name, "loss", loss)
        self.cal_acc = cal_acc

    def init_weights(self) -> None:
        """Applies init_cfg (once, as mmengine's BaseModule: a second call warns and does nothing)."""
        if self._first_init(f"fastbb.models.{type(self).__name__}"):
            _initialize(f"fastbb.models.{type(self).__name__}", self, _init_cfgs(self.init_cfg))

    def pre_logits(self, feats: tuple[Tensor, ...]) -> Tensor:
        """
        Args:
            feats (Tuple[Tensor]): the features, one per backbone stage output.

        Returns:
            Tensor: the last one.
        """
        return feats[-1]

    def forward(self, feats: tuple[Tensor, ...]) -> Tensor:
        """
        Args:
            feats (Tuple[Tensor]): the features; the last one is used.

        Returns:
            Tensor[N, C]: the class scores.
        """
        return self.pre_logits(feats)

    def loss(self, feats: tuple[Tensor, ...], data_samples: Any, **kwargs: Any) -> dict[str, Any]:
        """
        Args:
            feats (Tuple[Tensor]): the features.
            data_samples: the labels: data samples with ``gt_label`` (or ``gt_score``, which wins), or a tensor
                of (N,) class indices or (N, C) target scores.
            **kwargs: passed to the loss module.

        Returns:
            Dict[str, Any]: ``'loss'``, the loss module's on the batch (with avg_factor N), and with cal_acc an
            ``'accuracy_top-K'`` for each K of topk, as mmpretrain gives it: a list of one (1,) tensor, in %.
        """
        name = f"fastbb.models.{type(self).__name__}.loss"
        cls_score = self(feats)
        target = _loss_target(name, data_samples, cls_score)
        losses = {"loss": self.loss_module(cls_score, target, avg_factor=cls_score.size(0), **kwargs)}
        if self.cal_acc:
            if target.dim() != 1:
                raise ValueAssertionError(f"{name}: cal_acc needs class-index labels, got target scores of shape "
                                          f"{tuple(target.shape)} (batch augmentations such as Mixup give them); use "
                                          f"cal_acc=False")
            topk = (self.topk,) if isinstance(self.topk, int) else tuple(self.topk)
            losses.update({f"accuracy_top-{k}": a for k, a in zip(topk, _topk_accuracy(cls_score, target, topk))})
        return losses

    def predict(self, feats: tuple[Tensor, ...], data_samples: Any = None) -> list[Any]:
        """
        Args:
            feats (Tuple[Tensor]): the features.
            data_samples: None; or a data sample per image (or None for one), which is filled in and returned
                (an object without DataSample's setters gets ``pred_score`` and ``pred_label`` attributes); or a
                label tensor ((N,) indices or (N, C) scores), kept in each result as gt_label / gt_score.

        Returns:
            List: per image, a data sample with ``pred_score`` (Tensor[C], the softmax of the scores) and
            ``pred_label`` (Tensor[1], int64, its argmax): the given one, else mmpretrain's ``DataSample``
            where mmpretrain is installed, else a :class:`ClsPrediction`.
        """
        cls_score = self(feats)
        scores = F.softmax(cls_score, dim=1)
        labels = scores.argmax(dim=1, keepdim=True).detach()
        results = _result_samples(f"fastbb.models.{type(self).__name__}.predict", data_samples, cls_score.size(0))
        for sample, score, label in zip(results, scores, labels):
            if hasattr(sample, "set_pred_score") and hasattr(sample, "set_pred_label"):
                sample.set_pred_score(score).set_pred_label(label)
            else:
                sample.pred_score, sample.pred_label = score, label
        return results


@register("LinearClsHead", scopes=(SCOPE,), replaces_original=False)
class LinearClsHead(ClsHead):
    """
    mmpretrain's ``LinearClsHead``: one fully connected layer ``fc`` on the last feature.

    Args:
        num_classes (int): the number of classes (positive).
        in_channels (int): the number of input features.
        init_cfg (dict | List[dict], optional): what :meth:`init_weights` applies. Default:
            dict(type='Normal', layer='Linear', std=0.01) (weight ~ N(0, 0.01), bias 0).
        loss (dict | nn.Module): the classification loss. Default: dict(type='CrossEntropyLoss',
            loss_weight=1.0).
        topk (int | Tuple[int]): the top-k accuracies cal_acc adds. Default: (1,).
        cal_acc (bool): whether :meth:`loss` adds 'accuracy_top-K' entries. Default: False.
    """

    def __init__(self, num_classes: int, in_channels: int,
                 init_cfg: dict | None = dict(type="Normal", layer="Linear", std=0.01),
                 loss: dict | nn.Module = dict(type="CrossEntropyLoss", loss_weight=1.0),
                 topk: int | tuple[int, ...] = (1,), cal_acc: bool = False) -> None:
        super().__init__(loss=loss, topk=topk, cal_acc=cal_acc, init_cfg=init_cfg)
        self.in_channels = in_channels
        self.num_classes = num_classes
        if num_classes <= 0:
            raise ValueError(f"fastbb.models.LinearClsHead: num_classes={num_classes} must be a positive integer")
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, feats: tuple[Tensor, ...]) -> Tensor:
        """
        Args:
            feats (Tuple[Tensor]): the features; the last one, (N, in_channels), is used.

        Returns:
            Tensor[N, num_classes]: the class scores.
        """
        return self.fc(self.pre_logits(feats))


@register("GlobalAveragePooling", scopes=(SCOPE,), replaces_original=False)
class GlobalAveragePooling(nn.Module):
    """
    mmpretrain's ``GlobalAveragePooling`` neck: each feature averaged over its spatial dimensions, to (N, C).

    Args:
        dim (int): the number of spatial dimensions, 1, 2 or 3. Default: 2.
    """

    def __init__(self, dim: int = 2) -> None:
        super().__init__()
        if dim not in (1, 2, 3):
            raise ValueAssertionError(f"fastbb.models.GlobalAveragePooling: dim must be 1, 2 or 3, got {dim}")
        self.dim = dim
        self._pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[dim - 1]

    def init_weights(self) -> None:
        """Nothing to initialize: the neck has no parameters."""

    def _pooled(self, x):
        # flatten, not view: 0 images give (0, C)
        return self._pool(x, 1).flatten(1)

    def forward(self, inputs: Tensor | tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
        """
        Args:
            inputs (Tensor | Tuple[Tensor]): (N, C, *spatial) features, ``dim`` spatial dimensions, or a tuple
                of them.

        Returns:
            Tensor | Tuple[Tensor]: (N, C) each; a tuple for a tuple.
        """
        if isinstance(inputs, tuple):
            return tuple(self._pooled(x) for x in inputs)
        if isinstance(inputs, Tensor):
            return self._pooled(inputs)
        raise TypeError(f"fastbb.models.GlobalAveragePooling: inputs must be a tensor or a tuple of tensors, got "
                        f"{type(inputs).__name__}")


@register("ImageClassifier", scopes=(SCOPE,), replaces_original=False)
class ImageClassifier(_InitOnce, nn.Module):
    """
    mmpretrain's ``ImageClassifier``: backbone -> neck -> head, with its ``forward(inputs, data_samples, mode)``,
    ``extract_feat``, ``loss`` and ``predict``.

    Args:
        backbone (dict | nn.Module): the backbone, built by ``fastbb.build(cfg, scope='mmpretrain')`` (so a
            'ResNet' is fastbb's fused one); a type fastbb has no class for is built by mmpretrain where it is
            installed.
        neck (dict | nn.Module, optional): the neck, built the same way. Default: None.
        head (dict | nn.Module, optional): the head, built the same way. Default: None.
        pretrained (str, optional): a local checkpoint of the whole model, as
            init_cfg=dict(type='Pretrained', checkpoint=pretrained) (which it replaces). Default: None.
        train_cfg (dict, optional): mmpretrain's batch augmentations, which its data preprocessor applies (needs
            mmpretrain). Default: None.
        data_preprocessor (dict | nn.Module, optional): kept as ``self.data_preprocessor``; a dict is built by
            mmpretrain (type 'ClsDataPreprocessor' unless named; needs mmpretrain). None, with train_cfg None,
            keeps None: no model ``forward`` preprocesses (mmengine's ``train_step`` runs mmpretrain's).
            Default: None.
        init_cfg (dict | List[dict], optional): what :meth:`init_weights` applies to the whole model, e.g.
            dict(type='Pretrained', checkpoint=PATH) (loaded after the parts' own inits, non-strictly, as
            mmengine does; without mmengine fastbb loads local files itself). Default: None.
    """

    def __init__(self, backbone: dict | nn.Module, neck: dict | nn.Module | None = None,
                 head: dict | nn.Module | None = None, pretrained: str | None = None, train_cfg: dict | None = None,
                 data_preprocessor: dict | nn.Module | None = None, init_cfg: dict | None = None) -> None:
        super().__init__()
        name = "fastbb.models.ImageClassifier"
        if pretrained is not None:
            init_cfg = dict(type="Pretrained", checkpoint=pretrained)
        _check_init_cfg(name, init_cfg)
        self.init_cfg = copy.deepcopy(init_cfg)
        self.data_preprocessor = _build_data_preprocessor(name, data_preprocessor, train_cfg)
        self.backbone = _build_part(name, "backbone", backbone)
        self.neck = None if neck is None else _build_part(name, "neck", neck)
        self.head = None if head is None else _build_part(name, "head", head)
        # Backbones that convert third-party checkpoints while loading (some of mmpretrain's) do it in this hook.
        if hasattr(self.backbone, "_checkpoint_filter"):
            self._register_load_state_dict_pre_hook(self.backbone._checkpoint_filter)

    @property
    def with_neck(self) -> bool:
        return self.neck is not None

    @property
    def with_head(self) -> bool:
        return self.head is not None

    def init_weights(self) -> None:
        """
        Initialises the model as mmengine's BaseModule does, once (a second call warns and does nothing): the
        init_cfg's initialisers other than checkpoints, then each part not yet initialised (its own
        ``init_weights``), then the init_cfg's Pretrained checkpoints.
        """
        name = "fastbb.models.ImageClassifier"
        if not self._first_init(name):
            return
        cfgs = _init_cfgs(self.init_cfg)
        _initialize(name, self, [c for c in cfgs if not _is_pretrained(c)])
        for part in self.children():
            if hasattr(part, "init_weights") and not getattr(part, "is_init", False):
                part.init_weights()
        _initialize(name, self, [c for c in cfgs if _is_pretrained(c)])

    def forward(self, inputs: Tensor, data_samples: Any = None, mode: str = "tensor") -> Any:
        """
        Args:
            inputs (Tensor[N, C, H, W]): the images.
            data_samples: the labels (see :meth:`ClsHead.loss`), needed with mode 'loss'. Default: None.
            mode (str): 'tensor' (the head's class scores, or the features without a head), 'loss' (the dict of
                losses) or 'predict' (a result per image). Default: 'tensor'.

        Returns:
            Tensor | tuple | dict | list: as mode says.
        """
        if mode == "tensor":
            feats = self.extract_feat(inputs)
            return self.head(feats) if self.with_head else feats
        if mode == "loss":
            return self.loss(inputs, data_samples)
        if mode == "predict":
            return self.predict(inputs, data_samples)
        raise RuntimeError(f"fastbb.models.ImageClassifier: invalid mode {mode!r}; expected 'tensor', 'loss' or "
                           f"'predict'")

    def extract_feat(self, inputs: Tensor, stage: str = "neck") -> Any:
        """
        Args:
            inputs (Tensor[N, C, H, W]): the images.
            stage (str): where to stop: 'backbone' (its tuple of stage outputs), 'neck' (the neck's output, or
                the backbone's without a neck) or 'pre_logits' (the head's input to its last layer).
                Default: 'neck'.

        Returns:
            tuple | Tensor: the features of that stage.
        """
        name = "fastbb.models.ImageClassifier.extract_feat"
        if stage not in _STAGES:
            raise ValueAssertionError(f"{name}: invalid stage {stage!r}; choose from {_STAGES}")
        x = self.backbone(inputs)
        if stage == "backbone":
            return x
        if self.with_neck:
            x = self.neck(x)
        if stage == "neck":
            return x
        if not (self.with_head and hasattr(self.head, "pre_logits")):
            raise ValueAssertionError(f"{name}: stage 'pre_logits' needs a head with a pre_logits method")
        return self.head.pre_logits(x)

    def extract_feats(self, multi_inputs: Sequence[Tensor], **kwargs: Any) -> list:
        """
        Args:
            multi_inputs (Sequence[Tensor]): input batches (augmented inference).
            **kwargs: :meth:`extract_feat`'s other arguments.

        Returns:
            list: :meth:`extract_feat` of each batch.
        """
        if not isinstance(multi_inputs, Sequence):
            raise TypeError("fastbb.models.ImageClassifier.extract_feats: multi_inputs must be a sequence of "
                            "input batches (extract_feat takes one)")
        return [self.extract_feat(inputs, **kwargs) for inputs in multi_inputs]

    def loss(self, inputs: Tensor, data_samples: Any) -> dict[str, Any]:
        """
        Args:
            inputs (Tensor[N, C, H, W]): the images.
            data_samples: the labels (see :meth:`ClsHead.loss`).

        Returns:
            Dict[str, Any]: the head's losses.
        """
        return self.head.loss(self.extract_feat(inputs), data_samples)

    def predict(self, inputs: Tensor, data_samples: Any = None, **kwargs: Any) -> list[Any]:
        """
        Args:
            inputs (Tensor[N, C, H, W]): the images.
            data_samples: None, a data sample per image, or labels (see :meth:`ClsHead.predict`). Default: None.
            **kwargs: the head's other predict arguments.

        Returns:
            List: the head's result per image (see :meth:`ClsHead.predict`).
        """
        return self.head.predict(self.extract_feat(inputs), data_samples, **kwargs)

    def get_layer_depth(self, param_name: str) -> tuple[int, int]:
        """
        Args:
            param_name (str): a parameter's name in this model.

        Returns:
            Tuple[int, int]: the backbone's layer depth of the parameter and its largest depth (for layer-wise
            learning rate decay); a NotImplementedError where the backbone has no get_layer_depth.
        """
        if hasattr(self.backbone, "get_layer_depth"):
            return self.backbone.get_layer_depth(param_name, "backbone.")
        raise NotImplementedError(f"fastbb.models.ImageClassifier: the backbone {type(self.backbone).__name__} has "
                                  f"no get_layer_depth")


def _build_data_preprocessor(owner, cfg, train_cfg):
    """ImageClassifier's data_preprocessor: a module as given, None for none asked, else mmpretrain's build."""
    if isinstance(cfg, nn.Module):
        return cfg
    if cfg is None and train_cfg is None:
        return None
    if cfg is not None and not isinstance(cfg, dict):
        raise TypeError(f"{owner}: data_preprocessor must be a dict or an nn.Module, got {type(cfg).__name__}")
    registry = _mmpretrain("registry")
    if registry is None:
        what = "data_preprocessor" if cfg is not None else "train_cfg (batch augmentations)"
        raise ValueError(f"{owner}: {what} needs mmpretrain, which is not installed (fastbb's ImageClassifier "
                         f"preprocesses nothing itself); use data_preprocessor=None and train_cfg=None")
    cfg = dict(cfg or {})
    cfg.setdefault("type", "ClsDataPreprocessor")
    cfg.setdefault("batch_augments", train_cfg)
    return _build_with_mmpretrain(registry, cfg)
