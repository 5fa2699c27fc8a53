"""Backend-by-framework integrations, built on the two framework adapters.

Each module joins one backend (or one engine) to one framework; import the one you use:

    from attnsync.integrations import flashinfer   # FlashInfer plan()/run() from torch lowerings
    from attnsync.integrations import flex_torch   # FlexAttention block masks on torch
    from attnsync.integrations import graphs       # CUDA-graph runners over persistent lowerings
    from attnsync.integrations import vllm         # an attnsync.Batch from vLLM's metadata

This package itself imports nothing, so `import attnsync` never loads a framework.
"""

__all__: list[str] = []
