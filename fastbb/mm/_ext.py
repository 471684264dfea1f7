"""An ``mmcv._ext`` backed by fastbb, for mmcv installs without compiled ops (mmcv-lite). (Being written.)"""


def install_if_missing() -> bool:
    """Installs fastbb's mmcv._ext where mmcv is installed and its own cannot be imported; True if it did."""
    return False
