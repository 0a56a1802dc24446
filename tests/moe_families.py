"""Tiny random configs of every MoE family in the installed transformers (no downloads), for the coverage test."""

from __future__ import annotations

import glob
from typing import NamedTuple
import os

import torch

#: config fields shrunk wherever a config has them (text stack; hidden 48, 2 layers, 4 experts, top-2)
TINY = dict(
    vocab_size=97, unpadded_vocab_size=97, vocab_size_per_layer_input=97, hidden_size_per_layer_input=8,
    hidden_size=48, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=128,
    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2,
    moe_k=2, top_k=2, moe_topk=2, n_group=1, topk_group=1, n_shared_experts=1, first_k_dense_replace=1,
    q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, qk_head_dim=16,
    sliding_window=16, global_head_dim=12, linear_num_key_heads=2, linear_num_value_heads=2,
    linear_key_head_dim=12, linear_value_head_dim=12, expert_intermediate_size=32, ffn_hidden_size=64,
)


def moe_families() -> list[str]:
    """Return the model types whose modeling file declares experts with `@use_experts_implementation`."""
    import transformers

    root = os.path.dirname(transformers.__file__)
    return sorted(os.path.basename(os.path.dirname(f)) for f in glob.glob(f"{root}/models/*/modeling_*.py")
                  if "use_experts_implementation" in open(f).read())


def _set(config, key, value) -> None:
    try:
        setattr(config, key, value)
    except AttributeError:  # a derived property (Jamba's layer_types): set through its own fields instead
        pass


def _shrink(config, **extra) -> None:
    for key, value in TINY.items():
        try:
            present = hasattr(config, key) and not isinstance(getattr(config, key), (list, dict))
        except Exception:  # a per-layer attribute that refuses a global read
            present = False
        if present:
            _set(config, key, value)
    if getattr(config, "qk_rope_head_dim", None):  # multi-head latent attention: RoPE runs on head_dim
        _set(config, "head_dim", config.qk_rope_head_dim)
        _set(config, "num_key_value_heads", config.num_attention_heads)
    pad = getattr(config, "pad_token_id", None)
    if isinstance(pad, int) and pad >= config.vocab_size:
        config.pad_token_id = 0
    for key, value in extra.items():
        _set(config, key, value)
    n = config.num_hidden_layers
    if isinstance(getattr(config, "mlp_only_layers", None), list):  # layer indices: the first dense, then MoE
        config.mlp_only_layers = [0]
    for key in ("layer_types", "mlp_layer_types", "layers_block_type"):
        v = getattr(config, key, None)
        if isinstance(v, list) and len(v) > n:  # one layer of each kind, in order (linear then full attention)
            kinds = list(dict.fromkeys(v))
            _set(config, key, (kinds + [v[-1]] * n)[:n])


def _text_model_class(family: str, config_cls):
    """Return the modeling class built from `config_cls`: its causal LM if it has one, else its bare model."""
    import importlib

    from transformers import PreTrainedModel

    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    classes = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, PreTrainedModel)
               and getattr(c, "config_class", None) is config_cls]
    for suffix in ("ForCausalLM", "Model"):
        for c in classes:
            if c.__name__.endswith(suffix) and not c.__name__.endswith("PreTrainedModel"):
                return c
    raise ValueError(f"{family}: no model class takes {config_cls.__name__}")


#: config fields a family needs beyond TINY to have MoE layers at this size
EXTRA: dict[str, dict] = {
    "gemma4": dict(enable_moe_block=True, top_k_experts=2),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "mistral4": dict(head_dim=16),
    "kolibri1_1": dict(head_dim=16),  # NVFP4 fake-quantization of keys and values works in blocks of 16
    "qwen4_exp": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=12, indexer_budget=8,
                      indexer_compress_ratio=2),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=0),
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"], mamba_n_heads=8, mamba_d_head=12,
                             mamba_d_state=16, mamba_chunk_size=8),
    "glm4v_moe": dict(rope_parameters={"rope_theta": 10000.0, "rope_type": "default", "partial_rotary_factor": 0.5,
                                       "mrope_section": [1, 1, 1]}),
}


#: the canvas (block) length of the tiny block-diffusion models: the prompt length of the coverage test, so that
#: every stack sees as many tokens per forward
CANVAS = 8


def _tiny_diffusion_gemma(**extra):
    """Return a tiny DiffusionGemmaForBlockDiffusion: its per-layer config (`per_layer_config`: the full-attention
    layers' head_dim) is derived in the text config's constructor, so the tiny sizes go in there, not after."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, DiffusionGemmaTextConfig

    fields = DiffusionGemmaTextConfig.__dataclass_fields__
    text = {k: v for k, v in TINY.items() if k in fields}
    text.update(top_k_experts=2, global_head_dim=TINY["head_dim"], pad_token_id=0, eos_token_id=1, bos_token_id=2,
                layer_types=["sliding_attention", "full_attention"], **extra)
    vision = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=8)
    vocab = text["vocab_size"]  # the image tokens: the last three ids
    config = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=CANVAS,
                                  boi_token_id=vocab - 3, eoi_token_id=vocab - 2, image_token_id=vocab - 1)
    return DiffusionGemmaForBlockDiffusion(config)


def _tiny_dots3_note(**extra):
    """Return a tiny Dots3NoteForCausalLM: its per-layer config (the sliding-window layers' MLA sizes, given as
    `swa_*`) is derived in the text config's constructor."""
    from transformers.models.dots3_note.configuration_dots3_note import Dots3NoteTextConfig
    from transformers.models.dots3_note.modeling_dots3_note import Dots3NoteForCausalLM

    mla = dict(num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, head_dim=16,
               qk_nope_head_dim=8, v_head_dim=12)
    fields = dict(vocab_size=TINY["vocab_size"], hidden_size=48, intermediate_size=64, moe_intermediate_size=32,
                  num_hidden_layers=2, qk_rope_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                  n_shared_experts=1, shared_experts_intermediate_size=32, first_k_dense_replace=1, index_topk=8,
                  index_head_dim=16, index_n_heads=2, sliding_window=16, max_position_embeddings=128, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, **mla, **{f"swa_{k}": v for k, v in mla.items()})
    return Dots3NoteForCausalLM(Dots3NoteTextConfig(**{**fields, **extra}))


#: families whose tiny model is built by hand (a config that derives per-layer fields at construction)
BUILDERS = {"diffusion_gemma": _tiny_diffusion_gemma, "dots3_note": _tiny_dots3_note}


def is_block_diffusion(model) -> bool:
    """True for a block-diffusion model (DiffusionGemma): it denoises a canvas of `canvas_length` tokens."""
    return isinstance(getattr(model.config, "canvas_length", None), int)


def forward_inputs(model, ids: torch.Tensor) -> dict:
    """Return the forward's inputs for prompt ids: a block-diffusion model also gets a fixed canvas (its own
    forward would draw a random one each call)."""
    if not is_block_diffusion(model):
        return {"input_ids": ids}
    g = torch.Generator().manual_seed(2)
    canvas = torch.randint(0, model.config.get_text_config().vocab_size, (ids.shape[0], model.config.canvas_length),
                           generator=g)
    return {"input_ids": ids, "decoder_input_ids": canvas}


def build(family: str, scale: float = 4.0, **extra):
    """Return a tiny random fp32 causal LM of `family` (its text stack for multimodal families; DiffusionGemma
    whole, prompt encoder and denoiser), in eval mode."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    torch.manual_seed(0)
    if family in BUILDERS:
        model = BUILDERS[family](**extra)
    else:
        config = CONFIG_MAPPING[family]()
        text = config.get_text_config()
        _shrink(text, **{**EXTRA.get(family, {}), **extra})
        torch.manual_seed(0)
        try:
            model = AutoModelForCausalLM.from_config(text)
        except ValueError:  # a multimodal text stack with no causal-LM head of its own: the bare text model
            model = _text_model_class(family, type(text))(text)
    model = model.float().eval()
    with torch.no_grad():  # random init leaves activations tiny and nearly uniform: give curves some shape
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(scale)
    return model


def output_of(out) -> torch.Tensor:
    """Return the logits of a causal LM's output, or the last hidden state of a bare text model."""
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


class Reason(NamedTuple):
    """Why a family is not covered; `refused`: moeprof builds it and refuses it (its GLU is not exact)."""

    why: str
    refused: bool = False


UNSUPPORTED: dict[str, Reason] = {
    "inkling": Reason("transformers 5.25 ships its modeling file but registers no config (`CONFIG_MAPPING` has no "
                      "'inkling'), so no model can be built"),
    "deepseek_ocr2": Reason("its text stack has no standalone forward (`DeepseekOcr2TextPreTrainedModel` only); the "
                            "full OCR model needs image inputs"),
    "ernie4_5_vl_moe": Reason("its text stack has no standalone model class; the full model's multimodal position "
                              "ids need image inputs"),
}

COVERED = [f for f in moe_families() if f not in UNSUPPORTED]

#: MoE families of transformers 5.25 whose experts do not use the experts interface (not decorated): in the
#: table of docs/families.md, not profiled, with why (moeprof refuses them naming the nearest supported family)
NOT_DECORATED: dict[str, str] = {
    "dbrx": "not through the experts interface: `DbrxExperts` (undecorated) slices per-expert GLU weights "
            "(`DbrxExpertGLU` w1 / v1 / w2 [E·I, H]) in its own loop; a family layout is not written yet",
    "jetmoe": "not through the experts interface: `JetMoeParallelExperts` (undecorated) runs experts on tokens "
              "pre-sorted by expert (`expert_size`), and its attention is a mixture of experts too (MoA)",
    "llama4": "not through the experts interface: `Llama4TextExperts` (undecorated) runs every expert on every token, "
              "its input pre-multiplied by the router score (0 for unchosen experts), so no routed pairs exist",
}


def family_row(family: str, model) -> str:
    """Return the coverage-table row (docs/families.md) of a covered family, read from its built tiny model's
    sites."""
    from moeprof.arch import adapter_for, layer_stacks

    sites = adapter_for(model).sites(model)
    routed = next(s for s in sites if s.is_routed)
    layer = [layer for _, layers in layer_stacks(model) for layer in layers][routed.layer]
    where = next(n for n, m in layer.named_modules() if m is routed.experts)
    kinds = ", ".join(k for k in ("routed", "shared", "dense")
                      if any(("routed" if s.is_routed else s.kind) == k for s in sites))
    if len(layer_stacks(model)) > 1:
        kinds += " (in the prompt encoder and the denoiser)"
    layout = routed.layout
    path = "grouped kernel" if layout.kernel_ok else "plain grouped"
    return (f"| {family} | yes | `{type(routed.experts).__name__}` at `layer.{where}` | "
            f"{type(layout).__name__} ({layout.activation}) | {kinds} | {path} |")


def unsupported_row(family: str) -> str:
    why = UNSUPPORTED[family].why if family in UNSUPPORTED else NOT_DECORATED[family]
    return f"| {family} | no | | | | {why} |"


TABLE_HEADER = ("| family | profiled | experts class and place | layout (σ) | sites in the tiny config | "
                "sparsifying path / why not |\n|---|---|---|---|---|---|")


def coverage_table(rows: dict[str, str]) -> str:
    """Return the coverage table of docs/families.md: one row per MoE family (experts interface, or not:
    NOT_DECORATED), in name order."""
    body = [rows[f] if f in rows else unsupported_row(f) for f in sorted(set(moe_families()) | set(NOT_DECORATED))]
    return "\n".join([TABLE_HEADER, *body])


if __name__ == "__main__":  # python tests/moe_families.py > table.md (the table of docs/families.md)
    print(coverage_table({f: family_row(f, build(f)) for f in COVERED}))
