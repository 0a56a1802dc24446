"""lm-eval's own command line, with moeprof's model type and offline tasks available.

    python -m moeprof.evaluate --model moeprof --model_args pretrained=smollm2,type=i,p=0.9 \\
        --tasks moeprof_arc_easy --limit 50

lm-eval 0.4.13 finds model types only in its own registry (it does not read the ``lm_eval.models`` entry-point
group), so this launcher imports `moeprof.evaluate.lm_eval_model` (which registers "moeprof") and then hands
the arguments, unchanged, to lm-eval's `cli_evaluate`. Unless the user passes ``--include_path``, moeprof's
offline task folder is added (tasks named ``moeprof_<lm-eval name>``, see `moeprof.evaluate.tasks`) and the
data of the ``moeprof_`` tasks named in ``--tasks`` is extracted first if it is not cached yet.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Run lm-eval's CLI with "moeprof" registered and moeprof's task folder on the include path."""
    from moeprof.evaluate import lm_eval_model  # noqa: F401  (registers --model moeprof)

    args = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in args and any(a in ("run", "--tasks", "ls", "validate") for a in args):
        from moeprof.evaluate import tasks as offline

        # Extract the data of the moeprof_ tasks asked for (a no-op once cached), so lm-eval finds it.
        wanted = args[args.index("--tasks") + 1].split(",") if "--tasks" in args[:-1] else []
        for name in wanted:
            if name.startswith(offline.PREFIX) and name[len(offline.PREFIX):] in offline.TASKS:
                offline.prepare_task(name)
        args += ["--include_path", str(offline.lm_eval_task_dir())]
    from lm_eval.__main__ import cli_evaluate

    saved, sys.argv = sys.argv, ["lm_eval", *args]  # lm-eval's CLI parses sys.argv itself
    try:
        cli_evaluate()
    except lm_eval_model.ModelArgsError as exc:  # a bad --model_args value: one line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
