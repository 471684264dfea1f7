"""This folder is fastbb's source checkout, not the fastbb package (that is the fastbb/ folder inside it).

A script run from the folder that holds a checkout named `fastbb` would otherwise import the checkout as
an empty namespace package ("module 'fastbb' has no attribute 'nn'"), hiding the installed package. When
imported as `fastbb`, this file imports the installed package instead (an editable install of this very
checkout included), or says plainly that none is installed.
"""
if __name__ == "fastbb":
    import importlib
    import os
    import sys

    _container = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _saved_path = sys.path[:]
    # The real package is found as if the checkout's folder were not on the path.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _container]
    _shim = sys.modules.pop(__name__)
    try:
        _package = importlib.import_module("fastbb")
    except ImportError as exc:
        sys.modules[__name__] = _shim
        raise ImportError(
            f"'import fastbb' found fastbb's source checkout ({os.path.dirname(os.path.abspath(__file__))}), "
            "not the fastbb package, and no installed fastbb: install it (`pip install --no-build-isolation "
            "-e <checkout>`, see its README) or run from another folder") from exc
    finally:
        sys.path[:] = _saved_path
    # The import system hands the importer whatever sys.modules holds under the name at the end.
    sys.modules[__name__] = _package
