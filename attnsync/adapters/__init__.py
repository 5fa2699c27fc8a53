"""Framework adapters. Import the one you use explicitly:

    from attnsync.adapters import torch as ast   # imports torch
    from attnsync.adapters import jax as asj     # imports jax

This package itself imports nothing, so `import attnsync` never loads a framework.
"""
