"""Architecture adapters: MoE models found from the model (any experts-interface module), dense ones by `model_type`.

>>> adapter_for(model).sites(model)   # one Site per decoder layer: dense MLP or fused MoE experts
>>> site.layout.glu(x, expert)       # (u, g, i) of one expert, from the site's own weights
"""

from __future__ import annotations

import difflib
import importlib

from torch import nn

from moeprof.arch.base import (
    DENSE,
    ROUTED,
    SHARED,
    SITE_KINDS,
    Adapter,
    Site,
    decoder_layers,
    expert_weights,
    layer_stacks,
    text_config,
)
from moeprof.arch.layout import (
    LAYOUTS,
    DenseMLPLayout,
    FusedExpertsLayout,
    GLUBiases,
    GLUWeights,
    Layout,
    UnsupportedArchitecture,
    experts_layout,
)

# module per family, imported only when asked (a lazy registry keeps `import moeprof` light)
_FAMILIES = {
    "llama": "moeprof.arch.llama", "mistral": "moeprof.arch.llama",
    "qwen2": "moeprof.arch.qwen", "qwen3": "moeprof.arch.qwen",
    "gemma3_text": "moeprof.arch.gemma3", "gemma3": "moeprof.arch.gemma3",
    "qwen3_moe": "moeprof.arch.experts",
}
SUPPORTED = tuple(sorted(_FAMILIES))


def adapter_for(model_or_config) -> Adapter:
    """Return the adapter for a model (or its config).

    A model any of whose modules goes through transformers' experts interface takes the generic experts adapter
    (`moeprof.arch.experts`), whatever its model type; a dense model (or a bare config) is looked up by
    `model_type`.
    """
    from moeprof.arch.experts import ADAPTER as EXPERTS, has_experts

    if isinstance(model_or_config, nn.Module) and has_experts(model_or_config):
        return EXPERTS
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES:
        close = difflib.get_close_matches(str(model_type), SUPPORTED, n=1, cutoff=0.0)
        hint = f"; the nearest supported family is {close[0]!r}" if close else ""
        raise UnsupportedArchitecture(
            f"architecture {model_type!r} ({', '.join(getattr(config, 'architectures', None) or ['?'])}) has no "
            f"experts interface and no known dense GLU{hint}; supported model types: {', '.join(SUPPORTED)} and "
            "every MoE whose experts use transformers' `use_experts_implementation`.")
    return importlib.import_module(_FAMILIES[model_type]).ADAPTER


__all__ = ["Adapter", "Site", "SITE_KINDS", "ROUTED", "SHARED", "DENSE", "Layout", "FusedExpertsLayout",
           "DenseMLPLayout", "GLUWeights", "GLUBiases", "LAYOUTS", "experts_layout", "expert_weights", "SUPPORTED",
           "UnsupportedArchitecture", "adapter_for", "decoder_layers", "layer_stacks", "text_config"]
