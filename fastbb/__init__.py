"""fastbb: fused kernels for ResNet / FPN / RetinaNet detectors, under drop-in PyTorch modules."""
from fastbb._version import __version__  # noqa: E402

from fastbb._backend import backends, use_backend  # noqa: E402  (loads fastbb._C, warns once if unusable)
from fastbb._registry import build, register, registered  # noqa: E402
from fastbb import ops, nn, models  # noqa: E402
from fastbb.convert import convert  # noqa: E402
from fastbb._tracing import NotScriptableError  # noqa: E402
from fastbb.torchvision_patch import patch_torchvision, unpatch_torchvision  # noqa: E402

__all__ = ["NotScriptableError", "__version__", "backends", "build", "convert", "models", "nn", "ops",
           "patch_torchvision", "register", "registered", "unpatch_torchvision", "use_backend"]
