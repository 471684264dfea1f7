"""
fastbb's fused modules in the installed OpenMMLab packages (mmdet, mmseg, mmpretrain), so that unchanged
configs run fused: add ``custom_imports = dict(imports=["fastbb.mm"], allow_failed_imports=False)`` to a
config, or ``import fastbb.mm``.

On import, for each of mmdet, mmseg and mmpretrain that is installed, the package's models are imported
(so that its own registrations are done and cannot collide later), then every type name fastbb registers
for that package's scope (``fastbb.registered(scope)``) and the package's registry also has is replaced by
fastbb's class, which keeps that package's defaults and state_dict keys. Where mmcv's compiled ops are
missing (mmcv-lite), an ``mmcv._ext`` backed by fastbb is installed first (see fastbb.mm._ext), since
``import mmdet.models`` needs one.

:func:`unregister` puts the packages' own classes back; :func:`register` replaces them again.
"""
from fastbb.mm._registration import register, replaced, unregister

__all__ = ["register", "replaced", "unregister"]

register()
