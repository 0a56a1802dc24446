"""moeprof.models: every kind of spec loads, every user mistake is one clear ModelLoadError, recipes build."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_checkpoint, tiny_qwen3_model, tiny_tokenizer

from moeprof import models
from moeprof.models import ModelLoadError, build_on_meta, config_from_recipe, load_model, model_id

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


# ------------------------------------------------------------------------------------------------ user mistakes


def test_missing_path_raises_naming_the_path(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(str(missing))
    message = _one_line_error(excinfo)
    assert "no such file or folder" in message and str(missing) in message


def test_missing_gguf_file_is_a_missing_path_not_a_hub_id():
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        load_model("weights/model.Q4_0.gguf")


def test_folder_without_config_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(tmp_path)
    message = _one_line_error(excinfo)
    assert "not a model checkpoint folder" in message and "config.json" in message


def test_folder_holding_only_a_gguf_file_points_at_the_file(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(16))
    with pytest.raises(ModelLoadError, match=r"pass its path, e\.g\. .*m\.gguf"):
        load_model(tmp_path)


def test_file_that_is_not_gguf_is_rejected_by_content_not_name(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text('{"this is": "json"}')
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(fake)
    assert "not a GGUF file" in _one_line_error(excinfo)


def test_corrupt_gguf_file_raises_model_load_error(tmp_path):
    corrupt = tmp_path / "corrupt.bin"
    corrupt.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(200)))
    with pytest.raises(ModelLoadError, match="could not load the GGUF file"):
        load_model(corrupt)


@pytest.mark.parametrize("dtype", ["fp32", "float64", "int8", torch.float64])
def test_unknown_dtype_lists_the_choices(tiny_checkpoint, dtype):
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(tiny_checkpoint, dtype=dtype)
    assert "unknown dtype" in _one_line_error(excinfo) and "bfloat16" in str(excinfo.value)


@pytest.mark.parametrize("device", ["gpu", "mps", "cuda:0", ""])
def test_unknown_device_lists_the_choices(tiny_checkpoint, device):
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(tiny_checkpoint, device=device)
    assert "unknown device" in _one_line_error(excinfo) and "auto" in str(excinfo.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_cuda_device_says_so(tiny_checkpoint):
    with pytest.raises(ModelLoadError, match="no CUDA device"):
        load_model(tiny_checkpoint, device="cuda")


def test_unknown_name_suggests_the_closest_known_one():
    with pytest.raises(ModelLoadError) as excinfo:
        load_model("tiny-mo")
    assert "did you mean 'tiny-moe'" in _one_line_error(excinfo)


def test_hub_id_offline_fails_with_one_line_naming_the_hub():
    with pytest.raises(ModelLoadError) as excinfo:
        load_model("Qwen/Qwen3-30B-A3B")
    message = _one_line_error(excinfo)
    assert "'Qwen/Qwen3-30B-A3B'" in message and "hub can't be reached" in message and "HF_HUB_OFFLINE" in message
    assert excinfo.value.__cause__ is None  # no chained transformers traceback for a user to wade through


def test_hub_probe_failure_tries_only_the_local_cache(monkeypatch):
    # Not offline by configuration, but the endpoint refuses connections: fail at once, without retries.
    monkeypatch.setattr(models, "_hub_offline", lambda: False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ModelLoadError) as excinfo:
        load_model("someone/some-model")
    assert "http://127.0.0.1:9 is unreachable" in _one_line_error(excinfo)


def test_folder_without_tokenizer_raises(tmp_path):
    tiny_qwen3_model(tiny_tokenizer()).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(tmp_path)
    assert "no tokenizer files" in _one_line_error(excinfo)


# ------------------------------------------------------------------------------------------- folders, embedded


def test_saved_folder_round_trips_logits_exactly(tmp_path):
    tokenizer = tiny_tokenizer()
    original = tiny_qwen3_model(tokenizer, seed=3)
    save_tiny_checkpoint(tmp_path, original, tokenizer)
    model, loaded_tokenizer = load_model(tmp_path)
    ids = tokenizer(SENTENCE, return_tensors="pt").input_ids
    assert torch.equal(loaded_tokenizer(SENTENCE, return_tensors="pt").input_ids, ids)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_bfloat16_load_casts_every_parameter(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_device_auto_places_the_model_through_accelerate(tiny_checkpoint, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = {}
    real_from_pretrained = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_from_pretrained(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    model, tokenizer = load_model(tiny_checkpoint, device="auto")
    assert seen["device_map"] == "auto"
    ids = tokenizer(SENTENCE, return_tensors="pt").input_ids.to(model.device)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_embedded_name_loads_from_the_embedded_folder(tmp_path, monkeypatch):
    save_tiny_checkpoint(tmp_path / "tiny-moe")
    monkeypatch.setattr(models, "EMBEDDED_ROOT", tmp_path)
    model, tokenizer = load_model("tiny-moe")
    assert model.config.model_type == "qwen3"
    assert Path(model.name_or_path) == tmp_path / "tiny-moe"
    assert model_id("tiny-moe") == "moeprof/tiny-moe"


def test_embedded_name_not_shipped_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "EMBEDDED_ROOT", tmp_path)
    with pytest.raises(ModelLoadError) as excinfo:
        load_model("tiny-dense")
    assert "'tiny-dense' is not shipped" in _one_line_error(excinfo)


def test_model_id_is_stable_for_every_kind_of_spec(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_checkpoint.parent)
    assert model_id(tiny_checkpoint.name) == str(tiny_checkpoint.resolve())
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF" + bytes(8))
    assert model_id(gguf) == str(gguf.resolve())
    assert model_id("Qwen/Qwen3-30B-A3B") == "Qwen/Qwen3-30B-A3B"
    assert model_id("smollm2") == model_id("SmolLM2-135M-Instruct") == models.SMOLLM2_ID
    assert model_id("smollm2").startswith("HuggingFaceTB/SmolLM2-135M-Instruct")


# ------------------------------------------------------------------------------------------------- real SmolLM2


def test_smollm2_is_the_llama_135m_architecture(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert config.vocab_size == len(tokenizer) == 49152
    assert model.dtype == torch.float32 and not model.training
    assert getattr(config, "quantization_config", None) is None


def test_smollm2_greedy_continuation_is_sensible_english(smollm2):
    model, tokenizer = smollm2
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert "Paris" in tokenizer.decode(out[0, inputs.input_ids.shape[1]:])


def test_smollm2_second_load_reads_the_safetensors_cache(smollm2, monkeypatch):
    folder = models.smollm2_cache_folder()
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    def no_gguf(*args, **kwargs):
        raise AssertionError("load_model('smollm2') dequantized the GGUF file again instead of reading the cache")

    monkeypatch.setattr(models, "_dequantize_gguf", no_gguf)
    model, _ = load_model("smollm2")
    assert Path(model.name_or_path) == folder


@pytest.mark.slow
def test_smollm2_cached_copy_matches_the_gguf_dequantized_load(smollm2):
    cached, tokenizer = smollm2
    from_gguf, gguf_tokenizer = load_model(models.smollm2_gguf_path())  # the .gguf-file branch, ~25 s
    assert getattr(from_gguf.config, "quantization_config", None) is None
    ids = tokenizer(SENTENCE, return_tensors="pt").input_ids
    assert torch.equal(gguf_tokenizer(SENTENCE, return_tensors="pt").input_ids, ids)
    with torch.no_grad():
        torch.testing.assert_close(cached(ids).logits, from_gguf(ids).logits, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------- recipes


def _recipe(name: str) -> dict:
    with open(RECIPES / name, "rb") as f:
        return tomllib.load(f)


def test_qwen3_30b_recipe_builds_on_meta_with_the_real_parameter_counts():
    recipe = _recipe("qwen3-30b-a3b.toml")
    assert (recipe["model"], recipe["dtype"], recipe["device"]) == ("Qwen/Qwen3-30B-A3B", "bfloat16", "auto")
    config = config_from_recipe(recipe)
    assert type(config).__name__ == "Qwen3MoeConfig"
    assert config.rope_parameters["rope_theta"] == 1e6 and config.norm_topk_prob and config.head_dim == 128
    model = build_on_meta(config)
    assert all(p.device.type == "meta" for p in model.parameters())
    layers = model.model.layers
    assert len(layers) == 48
    assert all(type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in layers)
    assert tuple(layers[0].mlp.experts.gate_up_proj.shape) == (128, 2 * 768, 2048)  # [E, 2I, H]
    assert tuple(layers[0].mlp.experts.down_proj.shape) == (128, 2048, 768)  # [E, H, I]
    # Published sizes: 30.5 B parameters, 3.3 B active per token (8 of 128 experts).
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    active = total - experts + experts * 8 // 128
    assert round(total / 1e9, 2) == 30.53 and round(active / 1e9, 2) == 3.35


def test_smollm2_recipe_names_a_loadable_model_and_the_profile_settings():
    recipe = _recipe("smollm2-135m.toml")
    assert model_id(recipe["model"]) == models.SMOLLM2_ID
    assert recipe["types"] == ["x", "u", "g", "i"] and recipe["data"] == ["wikipedia:heldout"]
    assert "p_grid" not in recipe
    assert (recipe["dtype"], recipe["device"]) == ("float32", "cpu")
    assert (recipe["seq_len"], recipe["max_tokens"], recipe["batch_size"]) == (256, 4096, 4)


def test_config_from_recipe_without_config_table_or_model_type_raises():
    with pytest.raises(ModelLoadError, match=r"no \[config\] table"):
        config_from_recipe({"model": "smollm2"})
    with pytest.raises(ModelLoadError, match="no model_type"):
        config_from_recipe({"model": "x", "config": {"hidden_size": 8}})
    with pytest.raises(ModelLoadError, match="recipe for 'x'"):
        config_from_recipe({"model": "x", "config": {"model_type": "no_such_family"}})
