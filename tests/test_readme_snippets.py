"""Every ```python block of README.md and of docs/*.md runs as written: README.md first, then the pages of docs/ in
name order, each file's blocks in their order, in one fresh folder (a later block may read what an earlier one
wrote, e.g. docs/store.md reads the store the README's block wrote), each in its own namespace, in one subprocess
(so torch and transformers load once).

A block whose first line is `# not run by tests: <why>` is skipped by design (a big model or a long run); the test
lists such blocks and requires the reason. Keep them few.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP_MARK = "# not run by tests:"

RUNNER = r"""
import json, sys, traceback
blocks = json.loads(sys.stdin.read())
results = []
for i, (where, code) in enumerate(blocks):
    try:
        exec(compile(code, where, "exec"), {"__name__": f"doc_block_{i}"})
        results.append(None)
    except BaseException:
        results.append(traceback.format_exc(limit=4))
print("RESULTS " + json.dumps(results))
"""


DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def document_blocks() -> list[tuple[str, str]]:
    """(where, code) of every python block: README.md first, then docs/*.md in name order."""
    return [(f"{path.relative_to(REPO)} python block {i}", code)
            for path in DOCUMENTS for i, code in enumerate(python_blocks(path))]


def test_documents_have_python_blocks_and_marked_ones_say_why():
    assert python_blocks(REPO / "README.md"), "the README shows moeprof from Python"
    blocks = [code for _, code in document_blocks()]
    assert len(blocks) >= 3
    for code in blocks:
        first = code.splitlines()[0]
        if first.startswith(SKIP_MARK):
            assert len(first[len(SKIP_MARK):].strip()) > 10, f"a skipped block must say why: {first!r}"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("docs")
    runnable = [(w, c) for w, c in document_blocks() if not c.splitlines()[0].startswith(SKIP_MARK)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(runnable), cwd=work, env=env,
                          capture_output=True, text=True, timeout=900)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULTS ")), None)
    assert line is not None, proc.stderr[-3000:]
    return runnable, json.loads(line[len("RESULTS "):]), work, proc.stdout


def test_every_python_block_of_the_readme_and_docs_runs_as_written(results):
    runnable, errors, work, stdout = results
    failed = [f"{where}:\n{code}\n{err}" for (where, code), err in zip(runnable, errors) if err]
    assert not failed, "\n\n".join(failed)
    assert (work / "outputs" / "tiny-moe.h5").is_file()  # the README's block wrote the store docs/store.md reads
    import moeprof

    cfg = json.loads((Path(moeprof.__file__).parent / "embedded" / "tiny-moe" / "config.json").read_text())
    # realized.per_expert(): [layers, experts] of tiny-moe
    assert f"torch.Size([{cfg['num_hidden_layers']}, {cfg['num_local_experts']}])" in stdout
