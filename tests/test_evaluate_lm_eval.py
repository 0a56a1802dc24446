"""The lm-eval model type "moeprof": exactly lm-eval's `hf` scores when dense, sparsified when asked."""

from __future__ import annotations

import json
import math

import pytest

import lm_eval  # noqa: E402  (a hard dependency: a broken install must fail, not skip)

from conftest import tiny_qwen3_model, tiny_tokenizer  # noqa: E402

DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "Rome", "a river"], "label": 0},
    {"question": "A mixture of experts routes every token to", "choices": ["a few experts", "Rome", "nobody"],
     "label": 0},
    {"question": "She read the book by the", "choices": ["grass", "river", "kernels"], "label": 1},
    {"question": "Numbers like 3, 17 and", "choices": ["257", "Paris", "the children"], "label": 0},
    {"question": "Activation sparsity means most entries", "choices": ["carry little", "play", "read"], "label": 0},
]


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    """A folder holding a tiny multiple-choice task (`tiny_mc`) and a loglikelihood task (`tiny_ll`)."""
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (folder / "tiny_ll.yaml").write_text(
        "task: tiny_ll\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: loglikelihood\n"
        "test_split: test\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_target: "{{\' \' + choices[label]}}"\n'
        "metric_list:\n  - metric: perplexity\n  - metric: acc\n"
    )
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random tiny Qwen3 saved to a folder (dense GLU FFNs, so every activation type exists)."""
    folder = tmp_path_factory.mktemp("tiny-qwen3-lm-eval")
    tok = tiny_tokenizer()
    model = tiny_qwen3_model(tok, seed=3)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _run(model, model_args, local_task, **kw):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, model_args=model_args, tasks=["tiny_mc", "tiny_ll"],
                           task_manager=TaskManager(include_path=str(local_task), include_defaults=False),
                           batch_size=2, device="cpu", log_samples=True, **kw)


def _metrics(results):
    out = {}
    for task, res in results["results"].items():
        for key, value in res.items():
            if isinstance(value, float) and "stderr" not in key:
                out[(task, key)] = value
    return out


def _per_doc(results):
    return {task: [(s["doc_id"], [r[0] for r in s["filtered_resps"]] if s["filtered_resps"] else None)
                   for s in samples] for task, samples in results["samples"].items()}


@pytest.fixture(scope="module")
def hf_results(checkpoint, local_task):
    return _run("hf", f"pretrained={checkpoint},dtype=float32", local_task)


def test_moeprof_model_type_is_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    from moeprof.evaluate.lm_eval_model import MoeprofLM

    assert get_model("moeprof") is MoeprofLM
    assert get_model("hf").__name__ == "HFLM"  # registering ours keeps lm-eval's own models resolvable


def test_dense_moeprof_gives_exactly_hf_scores_by_name(checkpoint, local_task, hf_results):
    ours = _run("moeprof", f"pretrained={checkpoint}", local_task)
    assert _metrics(ours) == _metrics(hf_results)
    assert _per_doc(ours) == _per_doc(hf_results)


def test_dense_moeprof_from_model_object_gives_exactly_hf_scores(checkpoint, local_task, hf_results):
    from moeprof.evaluate.lm_eval_model import MoeprofLM
    from moeprof.models import load_model

    model, tok = load_model(str(checkpoint))
    lm = MoeprofLM(pretrained=model, tokenizer=tok, batch_size=2)
    ours = _run(lm, None, local_task)
    assert _metrics(ours) == _metrics(hf_results)
    assert lm.realized is None


def test_sparsified_run_changes_loglikelihoods_records_sparsity_and_restores_model(checkpoint, local_task,
                                                                                    hf_results):
    from moeprof.evaluate.lm_eval_model import MoeprofLM
    from moeprof.models import load_model

    model, tok = load_model(str(checkpoint))
    lm = MoeprofLM(pretrained=model, tokenizer=tok, type="i", rule="topp", p=0.5, batch_size=2)
    sparse = _run(lm, None, local_task)
    assert _per_doc(sparse) != _per_doc(hf_results)
    assert lm.realized is not None and 0.3 < lm.realized.token_weighted < 1.0
    assert int(lm.realized.tokens.sum()) > 0
    lm.set_sparsity(None, None)
    assert _per_doc(_run(lm, None, local_task)) == _per_doc(hf_results)  # the model was restored exactly


def test_model_args_string_parses_setting(checkpoint):
    from moeprof.evaluate.lm_eval_model import MoeprofLM

    lm = MoeprofLM.create_from_arg_string(f"pretrained={checkpoint},type=x,rule=topk,p=0.75,layers=0;1")
    assert (lm.sparsify_type, lm.sparsify_rule, lm.sparsify_p, lm.sparsify_layers) == ("x", "topk", 0.75, [0, 1])


@pytest.mark.parametrize("kw, match", [
    ({"type": "q", "p": 0.9}, "activation type"),
    ({"type": "i", "rule": "top", "p": 0.9}, "rule"),
    ({"type": "i"}, "both"),
    ({"type": "i", "p": 1.5}, r"\[0, 1\]"),
])
def test_bad_setting_is_rejected_before_loading(kw, match):
    from moeprof.evaluate.lm_eval_model import MoeprofLM

    with pytest.raises(ValueError, match=match):
        MoeprofLM(pretrained="/nonexistent", **kw)


def test_lm_eval_evaluator_gives_per_document_scores_and_realized_sparsity(checkpoint, local_task):
    from moeprof.evaluate.runners import lm_eval_evaluator
    from moeprof.models import load_model

    model, tok = load_model(str(checkpoint))
    evaluate = lm_eval_evaluator(model, tok, "tiny_mc", type="i", include_path=local_task, metric="acc_norm",
                                 batch_size=2)
    dense = evaluate(None)
    assert dense.example_values.shape == (len(DOCS),)
    assert dense.score == pytest.approx(dense.example_values.mean())
    assert math.isnan(dense.sparsity_token)
    sparse = evaluate(0.5)
    assert 0.3 < sparse.sparsity_token < 1 and sparse.per_expert_sparsity.shape == (2, 1)
    assert evaluate(None).score == dense.score  # dense again after a sparse run: the model was restored


def test_unknown_task_in_critical_sparsity_suggests_names(checkpoint):
    from moeprof.critical import critical_sparsity
    from moeprof.evaluate.tasks import UnknownTaskError

    with pytest.raises(UnknownTaskError, match="Did you mean 'arc_easy'"):
        critical_sparsity(None, None, type="i", task="arc_eas")


def _cli(args, env_extra, cwd, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", **env_extra}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def test_stock_lm_eval_cli_finds_moeprof_through_the_pth_hook(checkpoint, local_task, tmp_path):
    # A site dir holding only the one-line .pth file an install would ship: the unchanged lm-eval CLI then
    # resolves --model moeprof (lm-eval 0.4.13 ignores the lm_eval.models entry-point group).
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "moeprof-lm-eval.pth").write_text("import moeprof.evaluate.lm_eval_plugin\n")
    code = ("import site, sys; site.addsitedir(sys.argv[1]); sys.argv = ['lm_eval', *sys.argv[2:]]; "
            "from lm_eval.__main__ import cli_evaluate; cli_evaluate()")
    proc = _cli(["-c", code, str(site_dir), "--model", "moeprof", "--model_args",
                 f"pretrained={checkpoint},type=i,rule=topp,p=0.9", "--tasks", "tiny_mc", "--include_path",
                 str(local_task), "--limit", "3", "--device", "cpu"], {}, tmp_path, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiny_mc" in proc.stdout and "acc" in proc.stdout


def test_launcher_runs_lm_eval_cli_with_moeprof_registered(checkpoint, local_task, tmp_path):
    proc = _cli(["-m", "moeprof.evaluate", "--model", "moeprof", "--model_args", f"pretrained={checkpoint}",
                 "--tasks", "tiny_mc", "--include_path", str(local_task), "--limit", "2", "--device", "cpu"],
                {}, tmp_path, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiny_mc" in proc.stdout


@pytest.mark.real
def test_launcher_runs_a_shipped_offline_task(checkpoint, tmp_path):
    proc = _cli(["-m", "moeprof.evaluate", "--model", "moeprof", "--model_args", f"pretrained={checkpoint},type=i,p=0.8",
                 "--tasks", "moeprof_arc_easy", "--limit", "2", "--device", "cpu"], {}, tmp_path, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "moeprof_arc_easy" in proc.stdout and "acc_norm" in proc.stdout


@pytest.fixture(scope="module")
def wheel_root_files(tmp_path_factory):
    """{name: bytes} of the files at the root of a wheel built from this checkout (what lands in site-packages)."""
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    src = tmp_path_factory.mktemp("wheel-src")  # a copy: the build leaves build/ and *.egg-info behind
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    shutil.copytree(root / "moeprof", src / "moeprof", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(out), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("moeprof-*.whl")
    with zipfile.ZipFile(wheel) as z:
        return {n: z.read(n) for n in z.namelist() if "/" not in n}


def test_wheel_ships_the_pth_line_and_the_plugin_file_as_the_hook(wheel_root_files):
    from pathlib import Path

    from moeprof.evaluate import lm_eval_plugin as plugin

    assert set(wheel_root_files) == {plugin.PTH_NAME, f"{plugin.HOOK_MODULE}.py"}
    assert wheel_root_files[plugin.PTH_NAME].decode() == plugin.PTH_LINE
    assert wheel_root_files[f"{plugin.HOOK_MODULE}.py"] == Path(plugin.__file__).read_bytes()


def test_install_ships_the_same_hook_names_as_the_plugin(wheel_root_files):
    from moeprof.evaluate import lm_eval_plugin as plugin

    # the names an install ships, read from the built wheel (setup.py takes them from the plugin file)
    names = {"PTH_NAME": next(n for n in wheel_root_files if n.endswith(".pth")),
             "HOOK_MODULE": next(n[:-3] for n in wheel_root_files if n.endswith(".py"))}
    assert (names["PTH_NAME"], names["HOOK_MODULE"]) == (plugin.PTH_NAME, plugin.HOOK_MODULE)
    assert plugin.PTH_LINE == f"import {plugin.HOOK_MODULE}\n" and not plugin.HOOK_MODULE.startswith("moeprof")


def test_shipped_pth_imports_no_moeprof_at_start_and_registers_only_when_lm_eval_loads(tmp_path):
    import os
    import subprocess
    import sys
    import sysconfig
    from pathlib import Path

    from moeprof.evaluate.lm_eval_plugin import write_site_files

    site_dir = tmp_path / "site"
    site_dir.mkdir()
    write_site_files(site_dir)
    # -S: none of this environment's own .pth files run (an older moeprof install may ship one); the installed
    # packages are reachable as plain path entries, and only the shipped site dir is processed like site-packages.
    code = (
        "import sys; sys.path.append(sys.argv[2]); import site; site.addsitedir(sys.argv[1])\n"
        "def ours(): return sorted(m for m in sys.modules if m == 'moeprof' or m.startswith('moeprof.'))\n"
        "finders = [type(f) for f in sys.meta_path if 'moeprof' in type(f).__module__.lower() + type(f).__name__.lower()]\n"
        "print('START', ours(), 'torch' in sys.modules, [f.__module__ + '.' + f.__name__ for f in finders])\n"
        "import lm_eval.models\n"
        "from lm_eval.api.registry import model_registry\n"
        "left = [f for f in sys.meta_path if type(f).__name__ == 'MoeprofLmEvalFinder']\n"
        "print('LOADED', ours(), repr(model_registry._objs.get('moeprof')), len(left))\n"
        "from lm_eval.api.registry import get_model\n"
        "print('RESOLVED', get_model('moeprof').__name__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-S", "-c", code, str(site_dir), sysconfig.get_paths()["purelib"]],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    # At start: no moeprof module, no torch; the one finder comes from the tiny top-level hook module.
    assert lines["START"] == "[] False ['_moeprof_lm_eval_hook.MoeprofLmEvalFinder']"
    # lm-eval loaded: "moeprof" is a lazy placeholder, the finder is gone, still nothing of moeprof imported.
    assert lines["LOADED"] == "[] 'moeprof.evaluate.lm_eval_model:MoeprofLM' 0"
    assert lines["RESOLVED"] == "MoeprofLM"


def test_schedule_file_gives_the_scores_of_its_p_table(checkpoint, local_task, tmp_path):
    """`--model_args pretrained=...,schedule=S.json` scores exactly like MoeprofLM(p=<the schedule's table>)."""
    import numpy as np
    import torch

    from moeprof.evaluate.lm_eval_model import MoeprofLM
    from moeprof.models import load_model
    from moeprof.schedule import uniform

    model, tok = load_model(str(checkpoint))
    s = uniform(model, type="i", p=0.5)
    s.p = np.array([[0.4], [np.nan]])  # layer 1 left dense
    s.save(tmp_path / "s.json")
    by_name = _run("moeprof", f"pretrained={checkpoint},schedule={tmp_path / 's.json'}", local_task)
    lm = MoeprofLM(pretrained=model, tokenizer=tok, type="i", p=torch.tensor([[0.4], [float("nan")]]), batch_size=2)
    by_table = _run(lm, None, local_task)
    assert _per_doc(by_name) == _per_doc(by_table)
    assert _metrics(by_name) == _metrics(by_table)
    assert int(lm.realized.tokens[1].sum()) == 0 and int(lm.realized.tokens[0].sum()) > 0


def test_results_report_the_realized_sparsity_token_and_flop_weighted(checkpoint, local_task):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from moeprof.evaluate.lm_eval_model import MoeprofLM
    from moeprof.models import load_model

    model, tok = load_model(str(checkpoint))
    manager = TaskManager(include_path=str(local_task), include_defaults=False)
    lm = MoeprofLM(pretrained=model, tokenizer=tok, type="i", rule="topp", p=0.5, batch_size=2)
    config = simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=manager, limit=3)["config"]
    assert (config["moeprof_type"], config["moeprof_rule"], config["moeprof_p"]) == ("i", "topp", 0.5)
    r = lm.realized  # summed by capture.sparsify over every forward lm-eval made
    assert config["moeprof_realized_sparsity_token"] == pytest.approx(float(r.token_weighted))
    assert config["moeprof_realized_sparsity_flop"] == pytest.approx(float(r.flop_weighted))
    # by hand from the per-expert sums: token-weighted = Σ sparsity / Σ tokens (dense model: FLOP = token)
    assert config["moeprof_realized_sparsity_token"] == pytest.approx(float(r.sparsity_sum.sum() / r.tokens.sum()))
    assert 0.3 < config["moeprof_realized_sparsity_token"] < 1
    lm.set_sparsity(None, None)
    dense = lm.realized_summary()
    assert dense["moeprof_realized_sparsity_token"] is None and dense["moeprof_type"] is None


def test_a_model_object_draws_no_pretrained_type_warning_and_the_filter_is_removed(checkpoint, caplog):
    import logging

    from lm_eval.models.huggingface import HFLM

    from moeprof.evaluate.lm_eval_model import MoeprofLM
    from moeprof.models import load_model

    model, tok = load_model(str(checkpoint))
    logger = logging.getLogger("lm_eval.models.huggingface")
    with caplog.at_level(logging.WARNING, logger="lm_eval.models.huggingface"):
        HFLM(pretrained=model, tokenizer=tok)  # lm-eval itself warns about a model object ...
        assert any("not of type `str`" in r.getMessage() for r in caplog.records)
        caplog.clear()
        MoeprofLM(pretrained=model, tokenizer=tok)  # ... which MoeprofLM is built to take
        assert not any("not of type `str`" in r.getMessage() for r in caplog.records)
    assert logger.filters == []


def test_critical_evaluations_drop_gits_not_a_repository_lines_and_keep_the_rest(checkpoint, local_task, tmp_path,
                                                                                  monkeypatch, capfd):
    import os
    import subprocess

    from moeprof.evaluate.runners import child_stderr_without, lm_eval_evaluator
    from moeprof.models import load_model

    monkeypatch.chdir(tmp_path)  # not a git repository
    subprocess.run(["git", "describe", "--always"], capture_output=False, check=False)
    assert "fatal: not a git repository" in capfd.readouterr().err  # what lm-eval's git_hash lookup prints here
    with child_stderr_without(("fatal: not a git repository",)):
        subprocess.run(["git", "describe", "--always"], check=False)
        subprocess.run(["sh", "-c", "echo keep me >&2"], check=True)
    os.write(2, b"after\n")
    err = capfd.readouterr().err
    assert "fatal" not in err and "keep me\n" in err and err.endswith("after\n")
    model, tok = load_model(str(checkpoint))
    evaluate = lm_eval_evaluator(model, tok, "tiny_mc", type="i", include_path=local_task, batch_size=2, limit=2)
    evaluate(None)
    assert "not a git repository" not in capfd.readouterr().err


@pytest.mark.parametrize("args, match", [
    ("type=q,p=0.9", "type='q': unknown activation type"), ("type=i,p=2", "p=2.0: p must lie in [0, 1]"),
    ("type=i,p=nan", "p=nan: p must lie in [0, 1]"), ("type=i,rule=foo,p=0.9", "rule='foo'"),
    ("type=i,p=abc", "p='abc' is not a number"), ("type=i,p=0.9,layers=9", "layers [9] do not exist"),
    ("type=i,p=0.9,experts=x", "experts='x' is not a list"),
])
def test_lm_eval_model_args_are_checked_in_the_constructor(moe_ckpt, args, match):
    from moeprof.evaluate.lm_eval_model import MoeprofLM, ModelArgsError

    with pytest.raises(ModelArgsError, match=match.replace("[", r"\[").replace("]", r"\]")) as exc:
        MoeprofLM.create_from_arg_string(f"pretrained={moe_ckpt},{args}")
    assert isinstance(exc.value, ValueError)


@pytest.mark.slow  # lm-eval indexes its thousands of task files first (~20 s)
def test_lm_eval_launcher_prints_a_bad_model_arg_as_one_line(moe_ckpt, capsys):
    from moeprof.evaluate.__main__ import main as launcher

    with pytest.raises(SystemExit) as exc:
        launcher(["--model", "moeprof", "--model_args", f"pretrained={moe_ckpt},type=i,p=abc", "--tasks", "arc_easy"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ")
    assert "p='abc' is not a number" in err
