"""The one table of GLU activation functions σ: canonical name → torch function, and the config spellings of each.

torch only (a leaf): the architecture adapters, the kernels and per-expert tolerance all read it from here.

>>> canonical_activation("gelu_pytorch_tanh")
'gelu_tanh'
>>> activation_fn("swish")(torch.zeros(1))
tensor([0.])
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from moeprof.errors import InvalidArgument


def _gelu_tanh(v: torch.Tensor) -> torch.Tensor:
    return F.gelu(v, approximate="tanh")


# canonical name → σ. A new activation is one entry here plus its spellings in ACTIVATION_ALIASES.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_tanh": _gelu_tanh,
}

# every spelling a transformers config uses (`hidden_act`, `hidden_activation`) → canonical name; each
# spelling computes the same function as transformers' ACT2FN entry of that name (tests/test_sites.py checks).
ACTIVATION_ALIASES: dict[str, str] = {
    "silu": "silu", "swish": "silu",
    "gelu_tanh": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
}


def canonical_activation(name: str) -> str:
    """Return the canonical activation name for a config spelling; raise ValueError naming the known ones."""
    try:
        return ACTIVATION_ALIASES[name]
    except (KeyError, TypeError):
        raise InvalidArgument(f"activation {name!r} is not a GLU activation moeprof knows; known spellings: "
                         f"{', '.join(sorted(ACTIVATION_ALIASES))}") from None


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return σ for a canonical name or any of its config spellings."""
    return ACTIVATIONS[canonical_activation(name)]
