"""fastbb.patch_torchvision(): unmodified torchvision code builds fastbb's fused models.

What it replaces (each attribute as torchvision's code looks it up when a model is built):
- torchvision.models and torchvision.models.resnet: resnet18 ... resnet152, ResNet, BasicBlock, Bottleneck
  (so torchvision's other ResNet builders, wide_resnet50_2 and the ResNeXts, build fastbb's ResNet too);
- torchvision.models.detection and .retinanet: RetinaNet, retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2;
- the ResNet-50 and the FPN extractor every detection builder module calls (Faster / Mask / Keypoint R-CNN,
  FCOS, and backbone_utils.resnet_fpn_backbone): those models get fastbb's fused ResNet + FPN backbone;
- torchvision's model registry (torchvision.models.get_model / get_model_builder / list_models) for the
  replaced builders, under builders that keep torchvision's signature (get_model_weights keeps working).
fastbb.unpatch_torchvision() puts every original back.
"""
import functools
import importlib
import inspect

_patched: list[tuple[object, str, object]] = []  # (module or registry dict, name, the original), in order


def _original(owner, name):
    return next(original for o, n, original in _patched if o is owner and n == name)


def _replace(owner, name, value):
    is_dict = isinstance(owner, dict)
    _patched.append((owner, name, owner[name] if is_dict else getattr(owner, name)))
    if is_dict:
        owner[name] = value
    else:
        setattr(owner, name, value)


def _with_signature_of(original, replacement):
    """replacement under original's name and signature: torchvision's registry reads the weights enum from
    a builder's signature (get_model_weights)."""
    @functools.wraps(original)
    def builder(*args, **kwargs):
        return replacement(*args, **kwargs)
    builder.__signature__ = inspect.signature(original)
    builder.__wrapped__ = replacement
    return builder


def patch_torchvision() -> list[str]:
    """
    Makes torchvision build fastbb's fused models (see the module docstring for what is replaced): after
    it, ``torchvision.models.resnet50()``, ``torchvision.models.detection.retinanet_resnet50_fpn()``,
    ``torchvision.models.get_model("retinanet_resnet50_fpn", ...)`` and the R-CNN / FCOS builders' ResNet-50
    FPN backbones are fastbb's, with torchvision's arguments, weights and state_dict keys. Models built
    before are not changed (use :func:`fastbb.convert` on them). Calling it again changes nothing.

    Returns:
        list[str]: the replaced attributes, ``"module.name"`` each.
    """
    import torchvision.models
    from torchvision.models import _api, resnet as tv_resnet
    from torchvision.models import detection as tv_detection

    import fastbb.models
    from fastbb.models import detection

    if _patched:
        return sorted(_describe(owner, name) for owner, name, _ in _patched)
    try:
        _patch(torchvision.models, _api, tv_resnet, tv_detection, fastbb.models, detection)
    except BaseException:
        unpatch_torchvision()  # all or nothing
        raise
    return sorted(_describe(owner, name) for owner, name, _ in _patched)


def _patch(tv_models, _api, tv_resnet, tv_detection, fastbb_models, detection):
    resnet_builders = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
    for name in resnet_builders + ("ResNet", "BasicBlock", "Bottleneck"):
        for owner in (tv_models, tv_resnet):
            if hasattr(owner, name):  # (the block classes are not exported by torchvision.models)
                _replace(owner, name, getattr(fastbb_models, name))
    retinanet = importlib.import_module("torchvision.models.detection.retinanet")
    detection_builders = ("retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2")
    for name in detection_builders + ("RetinaNet",):
        for owner in (tv_detection, retinanet):
            _replace(owner, name, getattr(detection, name))
    for module_name in ("backbone_utils", "faster_rcnn", "mask_rcnn", "keypoint_rcnn", "fcos", "retinanet"):
        module = importlib.import_module(f"torchvision.models.detection.{module_name}")
        if hasattr(module, "resnet50"):
            _replace(module, "resnet50", fastbb_models.resnet50)
        _replace(module, "_resnet_fpn_extractor", detection.resnet_fpn_extractor)
    for name in resnet_builders:
        _replace(_api.BUILTIN_MODELS, name, _with_signature_of(_original(tv_resnet, name),
                                                               getattr(fastbb_models, name)))
    for name in detection_builders:
        _replace(_api.BUILTIN_MODELS, name, _with_signature_of(_original(retinanet, name),
                                                               getattr(detection, name)))


def _describe(owner, name):
    return f"torchvision.models registry[{name!r}]" if isinstance(owner, dict) else f"{owner.__name__}.{name}"


def unpatch_torchvision() -> None:
    """Undoes :func:`patch_torchvision`: every replaced attribute and registry entry is torchvision's again.
    Models built while patched stay fastbb's."""
    for owner, name, original in reversed(_patched):
        if isinstance(owner, dict):
            owner[name] = original
        else:
            setattr(owner, name, original)
    _patched.clear()
