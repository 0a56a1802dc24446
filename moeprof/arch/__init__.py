"""Architecture adapters, one file per family, found by the config's `model_type`.

>>> adapter_for(model).sites(model)   # one Site per decoder layer: dense MLP or fused MoE experts
>>> site.layout.glu(x, expert)       # (u, g, i) of one expert, from the site's own weights
"""

from __future__ import annotations

import difflib
import importlib

from moeprof.arch.base import (
    DENSE,
    ROUTED,
    SHARED,
    SITE_KINDS,
    Adapter,
    Site,
    decoder_layers,
    expert_weights,
    text_config,
)
from moeprof.arch.layout import (
    LAYOUTS,
    DenseMLPLayout,
    FusedExpertsLayout,
    GLUBiases,
    GLUWeights,
    Layout,
    experts_layout,
)

# module per family, imported only when asked (a lazy registry keeps `import moeprof` light)
_FAMILIES = {
    "llama": "moeprof.arch.llama", "mistral": "moeprof.arch.llama",
    "qwen2": "moeprof.arch.qwen", "qwen3": "moeprof.arch.qwen",
    "gemma3_text": "moeprof.arch.gemma3", "gemma3": "moeprof.arch.gemma3",
    "qwen3_moe": "moeprof.arch.qwen3_moe",
}
SUPPORTED = tuple(sorted(_FAMILIES))


class UnsupportedArchitecture(ValueError):
    """The model's architecture has no moeprof adapter."""


def adapter_for(model_or_config) -> Adapter:
    """Return the adapter for a model (or its config), by `model_type`."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES:
        close = difflib.get_close_matches(str(model_type), SUPPORTED, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnsupportedArchitecture(
            f"architecture {model_type!r} ({', '.join(getattr(config, 'architectures', None) or ['?'])}) is not "
            f"supported; supported model types: {', '.join(SUPPORTED)}.{hint}")
    return importlib.import_module(_FAMILIES[model_type]).ADAPTER


__all__ = ["Adapter", "Site", "SITE_KINDS", "ROUTED", "SHARED", "DENSE", "Layout", "FusedExpertsLayout",
           "DenseMLPLayout", "GLUWeights", "GLUBiases", "LAYOUTS", "experts_layout", "expert_weights", "SUPPORTED",
           "UnsupportedArchitecture", "adapter_for", "decoder_layers", "text_config"]
