"""Build hook for the optional C twin of attnsync's hot numpy steps (attnsync/_native.c).

Everything else lives in pyproject.toml. `optional=True`: without a C compiler (or Python's
headers) the build warns and installs attnsync without it; attnsync/_accel.py then uses the
numpy forms, which give the same values.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("attnsync._native", ["attnsync/_native.c"], optional=True,
                             extra_compile_args=["-O2"])])
