"""What the command modules share: the consoles, argument types and help texts, progress and warning lines,
and where outputs go by default."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from moeprof.rules import SEARCHABLE_RULES, rules_help

console = Console()
err_console = Console(stderr=True)

DEFAULT_OUTPUTS = Path("outputs")


def default_out(model: str, suffix: str = "") -> Path:
    """Return outputs/<model name><suffix>.h5 for a model spec (folder, file, hub id or embedded name)."""
    stem = Path(str(model).rstrip("/")).name.replace(".gguf", "") or "model"
    return DEFAULT_OUTPUTS / f"{stem}{suffix}.h5"


def count(minimum: int):
    """Return an argparse type: an integer >= `minimum` (argparse prints the refusal and exits 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse

def top_rows(text: str) -> int:
    """Parse --top: a whole number >= 0, or "all" (0 and all: every row)."""
    if text.strip().lower() == "all":
        return 0
    return count(0)(text)

top_rows.__name__ = "integer >= 0 or 'all'"


MODEL_HELP = "a checkpoint folder, a .gguf file, a hub id, or tiny-moe / tiny-dense / smollm2"
DTYPE_HELP = "weights and activations dtype (default float32; float16/bfloat16 halve memory on a GPU)"
DEVICE_HELP = "cpu, cuda, or auto (accelerate's device_map=auto: spread over GPUs and CPU) (default cpu)"
RULE_HELP = rules_help(SEARCHABLE_RULES)
BATCH_HELP = "sequences (or documents) per forward pass (default 8)"
PPL_TASK_HELP = ("ppl:wikipedia, ppl:owt, ppl:code, ppl:mixed or ppl:domains (held-out Wikipedia / OpenWebText / "
                 "Python source shipped on PyPI; mixed = the first two, domains = all three, interleaved; score = "
                 "1/perplexity), ppl:FILE (a text or JSONL file), or an offline lm-eval "
                 "task: hellaswag, arc_easy, arc_challenge, piqa, winogrande, boolq, sciq, openbookqa, social_iqa, "
                 "lambada_openai, mmlu, gsm8k_cot (`moeprof tasks list`)")

FORCE_HELP = ("replace an existing output that is not a moeprof store, is read-only, or is a symlink (its target "
               "is written); without it such a file is refused, never overwritten")


def add_model_args(p) -> None:
    """Add --dtype and --device (the model's weights dtype and where it runs) to a command's parser."""
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help=DTYPE_HELP)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help=DEVICE_HELP)


def log_line(line: str) -> None:
    """Print one plain progress line (an evaluation, a stage): shown in a terminal and in a piped log alike."""
    console.print(line, markup=False, highlight=False, soft_wrap=True)

def warning_line(message: str) -> None:
    """Print one yellow `warning:` line (never wrapped: a log keeps it whole)."""
    console.print(f"[yellow]warning:[/yellow] {escape(str(message))}", highlight=False, soft_wrap=True)
