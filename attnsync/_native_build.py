"""`python -m attnsync._native_build`: compile attnsync/_native.c in place (see attnsync/_accel.py).

For a source checkout used without `pip install` (the GPU suite runs one): builds the module
next to its source with the C compiler Python was built with, and prints its path.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sysconfig


def build_in_place() -> str:
    """Compile attnsync/_native.c into attnsync/_native<EXT_SUFFIX>; the module's path."""
    here = os.path.dirname(os.path.abspath(__file__))
    target = os.path.join(here, "_native" + sysconfig.get_config_var("EXT_SUFFIX"))
    flags = ["-O2", "-shared", "-fPIC", "-I", sysconfig.get_paths()["include"],
             os.path.join(here, "_native.c"), "-o", target]
    compilers = [shlex.split(sysconfig.get_config_var("CC") or "cc"), ["cc"], ["gcc"]]
    for compiler in compilers:  # Python's own compiler first; its name may not exist here
        try:
            subprocess.run([*compiler, *flags], check=True)
            return target
        except (FileNotFoundError, subprocess.CalledProcessError) as exc:
            failure = exc
    raise RuntimeError(f"no C compiler built attnsync/_native.c (tried {compilers}): {failure}")


if __name__ == "__main__":
    print(build_in_place())
