"""Kernel selection: `kernel(op, impl)`.

`reference` is plain fp32 PyTorch: the CPU path today and the oracle every faster
implementation (compiled, chunked, Triton) is tested against when it is added.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from compressor.cuda import reference

Kernel = Callable[..., torch.Tensor]

IMPLEMENTATIONS: dict[str, dict[str, Kernel]] = {
    "reference": {
        "kl_divergence": reference.kl_divergence,
        "feature_mse": reference.feature_mse,
        "feature_cosine": reference.feature_cosine,
    },
}


def kernel(op: str, impl: str = "reference") -> Kernel:
    """The `op` kernel of implementation `impl`; an unknown pair is an error listing what exists."""
    table = IMPLEMENTATIONS.get(impl)
    if table is None or op not in table:
        have = {name: sorted(ops) for name, ops in IMPLEMENTATIONS.items()}
        raise KeyError(f"no {op!r} kernel in implementation {impl!r}; registered: {have}")
    return table[op]
