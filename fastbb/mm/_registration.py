"""Replacing OpenMMLab registry entries by fastbb's classes, and putting the originals back."""
import importlib
import importlib.util

from fastbb import _registry

# The package, the module whose import registers its models, and the module holding its registries.
PACKAGES = {
    "mmdet": ("mmdet.models", "mmdet.registry"),
    "mmseg": ("mmseg.models", "mmseg.registry"),
    "mmpretrain": ("mmpretrain.models", "mmpretrain.registry"),
}
# Registries searched for a type name, in order (a backbone is in MODELS, a box coder in TASK_UTILS).
_REGISTRIES = ("MODELS", "TASK_UTILS")

# (package, registry name, type name) -> the package's own class, for each entry fastbb replaced
_originals = {}


def installed_packages() -> list[str]:
    """The OpenMMLab packages fastbb.mm patches that are installed here."""
    return [package for package in PACKAGES if importlib.util.find_spec(package) is not None]


def _fastbb_classes(package):
    """The type names fastbb registers for a package's scope, with their classes, after fastbb's modules that
    register only with the package installed (they subclass its classes) are imported."""
    if package == "mmdet":
        importlib.import_module("fastbb.mm.retina_head")
    return {name: _registry.lookup(name, package) for name in _registry.registered(package)
            if _registry.replaces_original(name, package)}


def register() -> dict[str, list[str]]:
    """
    Replaces, in each installed OpenMMLab package's registries, the type names fastbb registers for that
    package's scope by fastbb's classes (again after :func:`unregister`; a second call changes nothing).

    Returns:
        Dict[str, List[str]]: per package patched, the type names replaced. An ImportError when none of
        mmdet, mmseg and mmpretrain is installed.
    """
    packages = installed_packages()
    if not packages:
        raise ImportError("fastbb.mm: none of mmdet, mmseg and mmpretrain is installed; fastbb.mm registers fastbb's "
                          "fused modules in their registries (fastbb.build builds fastbb's modules without them)")
    from fastbb.mm import _ext
    _ext.install_if_missing()
    done = {}
    for package in packages:
        models_module, registry_module = PACKAGES[package]
        importlib.import_module(models_module)
        registries = importlib.import_module(registry_module)
        done[package] = []
        for name, cls in _fastbb_classes(package).items():
            for registry_name in _REGISTRIES:
                registry = getattr(registries, registry_name)
                current = registry._module_dict.get(name)
                if current is None:
                    continue
                key = (package, registry_name, name)
                if current is not cls:
                    _originals.setdefault(key, current)
                    registry.register_module(name=name, module=cls, force=True)
                done[package].append(name)
                break
    return done


def unregister() -> None:
    """Puts every OpenMMLab class fastbb.mm replaced back into its registry."""
    for (package, registry_name, name), original in list(_originals.items()):
        registry = getattr(importlib.import_module(PACKAGES[package][1]), registry_name)
        registry.register_module(name=name, module=original, force=True)
        del _originals[(package, registry_name, name)]


def replaced() -> dict[str, dict[str, type]]:
    """
    What fastbb.mm has replaced now.

    Returns:
        Dict[str, Dict[str, type]]: per package, each replaced type name and the package's own class.
    """
    out = {}
    for (package, _, name), original in _originals.items():
        out.setdefault(package, {})[name] = original
    return out
