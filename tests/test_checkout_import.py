"""A script run beside a checkout named fastbb imports the installed package, not the checkout folder."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_beside_checkout(tmp_path, *python_flags):
    os.symlink(ROOT, tmp_path / "fastbb")  # the checkout, under the name a clone gets
    script = tmp_path / "script.py"
    script.write_text("import fastbb\nprint(fastbb.nn.__name__, fastbb.__file__)\n")
    return subprocess.run([sys.executable, *python_flags, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)


def test_script_beside_the_checkout_gets_the_installed_package(tmp_path):
    result = _run_beside_checkout(tmp_path)
    assert result.returncode == 0, result.stderr
    name, path = result.stdout.split()
    assert name == "fastbb.nn" and path.endswith(os.path.join("fastbb", "__init__.py"))


def test_without_an_installed_package_the_error_says_what_happened(tmp_path):
    result = _run_beside_checkout(tmp_path, "-S")  # no site-packages: nothing installed
    assert result.returncode != 0
    assert "found fastbb's source checkout" in result.stderr and "not the fastbb package" in result.stderr
