"""The notebook API: every exported name is what it says, whatever was imported before."""

import subprocess
import sys


def test_exported_functions_are_not_replaced_by_their_modules():
    # Importing zfnet.atlas loads zfnet.mine and zfnet.project; Python then binds those submodules to the
    # package's attributes, which must still be the functions.
    code = ("import types, zfnet.atlas, zfnet.correspondence, zfnet\n"
            "bad = [n for n in zfnet.__all__ if isinstance(getattr(zfnet, n), types.ModuleType)]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
