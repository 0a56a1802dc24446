"""An lm-eval model type "moeprof": Hugging Face's HFLM with one activation type sparsified at every FFN site.

From Python (any model object, or any moeprof model spec):

    from moeprof.evaluate.lm_eval_model import MoeprofLM
    lm = MoeprofLM(pretrained=model, tokenizer=tokenizer, type="i", rule="topp", p=0.9)
    lm_eval.simple_evaluate(model=lm, tasks=[...])
    lm.realized.token_weighted          # sparsity actually realized over everything lm-eval ran

From the shell: the stock `lm_eval --model moeprof ...` (the package's `moeprof-lm-eval.pth` registers this model
once lm-eval has loaded its own; lm-eval 0.4.13 reads no entry points, see `moeprof.evaluate.lm_eval_plugin`), or
the launcher `moeprof-lm-eval` / `python -m moeprof.evaluate`, which also adds moeprof's offline task folder:

    moeprof-lm-eval --model moeprof \\
        --model_args pretrained=smollm2,type=i,rule=topp,p=0.9 --tasks moeprof_hellaswag --limit 100
    lm_eval --model moeprof --model_args pretrained=smollm2,schedule=S.json ...   # a per-expert schedule

`pretrained` may be a model object, or a string resolved by `moeprof.models.load_model`: a local folder, a
`.gguf` file, a hub id, or an embedded name / alias ("tiny-moe", "tiny-dense", "smollm2").
With `type` and `p` unset nothing is sparsified and the scores are exactly
those of lm-eval's `--model hf` on the same model (tests/test_evaluate_lm_eval.py).

Each forward lm-eval makes runs inside `moeprof.capture.sparsify`, which restores the model on exit; the
sparsity realized in every call is summed into `self.realized` (a `moeprof.capture.Realized`). It counts every
position the model ran, including the right-padding lm-eval adds to batch requests of unequal length.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Sequence

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from moeprof.errors import MoeprofError

MODEL_NAME = "moeprof"


class ModelArgsError(MoeprofError, ValueError):
    """A bad `--model_args` value of the moeprof model type (a ValueError, the type lm-eval raises for bad
    arguments; the message names the argument, and `python -m moeprof.evaluate` prints it as one line)."""


def _int_list(value: Any, name: str = "layers") -> list[int] | None:
    """Parse layers/experts given as a list, an int, or a string "0;3;5" / "0-3" (commas separate lm-eval args)."""
    try:
        return _parse_int_list(value)
    except (TypeError, ValueError):
        raise ModelArgsError(f"--model_args {name}={value!r} is not a list of whole numbers; give e.g. {name}=0;3 "
                             f"or {name}=0-3") from None


def _parse_int_list(value: Any) -> list[int] | None:
    if value is None or isinstance(value, (list, tuple)):
        return None if value is None else [int(v) for v in value]
    if isinstance(value, int):
        return [value]
    out: list[int] = []
    for part in str(value).replace(":", ";").split(";"):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


_HF_LOGGER = "lm_eval.models.huggingface"
_OBJECT_PRETRAINED_WARNING = "`pretrained` model kwarg is not of type `str`"


@contextlib.contextmanager
def _without_log_record(logger_name: str, prefix: str):
    """Within: records of logger `logger_name` whose message starts with `prefix` are dropped (a filter on that
    one logger, removed on exit; every other record passes)."""

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith(prefix)

    logger, drop = logging.getLogger(logger_name), _Drop()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


@register_model(MODEL_NAME)
class MoeprofLM(HFLM):
    """HFLM that sparsifies activation `type` with `rule` at parameter `p` in every forward (None = dense)."""

    def __init__(self, pretrained: str | torch.nn.Module = None, *, type: str | None = None, rule: str = "topp",
                 p: float | torch.Tensor | None = None, layers: Sequence[int] | str | None = None,
                 experts: Sequence[int] | str | None = None, tokenizer: Any = None, dtype: str = "float32",
                 device: str | None = "cpu", schedule: Any = None, **kwargs):
        if pretrained is None:
            raise ModelArgsError("MoeprofLM needs pretrained=<model object or moeprof model spec>, "
                                 "e.g. --model_args pretrained=smollm2,type=i,p=0.9")
        if p is not None and not isinstance(p, torch.Tensor):
            try:
                p = float(p)
            except (TypeError, ValueError):
                raise ModelArgsError(f"--model_args p={p!r} is not a number; p must lie in [0, 1], e.g. p=0.9") from None
        layers, experts = _int_list(layers, "layers"), _int_list(experts, "experts")
        from moeprof.schedule.apply import setting
        from moeprof.schedule.data import ScheduleError

        try:  # a per-expert schedule (file path or Schedule), or type / rule / p / layers / experts
            self.setting = setting(schedule=schedule, type=type, rule=rule, p=p, layers=layers, experts=experts)
        except ScheduleError as exc:
            raise ModelArgsError(f"--model_args {exc}") from None
        schedule_name = None
        if schedule is not None:
            schedule_name = str(schedule) if isinstance(schedule, (str, bytes)) or hasattr(schedule, "__fspath__") \
                else "object"
        if isinstance(pretrained, (str, bytes)) or hasattr(pretrained, "__fspath__"):
            from moeprof.models import load_model

            model, loaded_tok = load_model(str(pretrained), dtype="float32" if dtype in (None, "auto") else dtype,
                                           device=device if device in ("cpu", "cuda", "auto") else "cpu")
            self.model_spec = str(pretrained)
            pretrained, tokenizer = model, tokenizer if tokenizer is not None else loaded_tok
        else:
            self.model_spec = getattr(getattr(pretrained, "config", None), "name_or_path", None)
        with _without_log_record(_HF_LOGGER, _OBJECT_PRETRAINED_WARNING):  # passing a model object is our design
            super().__init__(pretrained=pretrained, tokenizer=tokenizer, **kwargs)
        st = self.setting
        self.schedule = None if st is None else st.schedule
        self._schedule_name = schedule_name
        self.sparsify_type, self.sparsify_rule = (None, rule) if st is None else (st.type, st.rule)
        self.sparsify_p, self.sparsify_layers, self.sparsify_experts = None, layers, experts
        if st is not None:  # the whole setting, checked against this model now, not at the first forward
            try:
                table = st.table(self.model)  # ScheduleError when a schedule was made for another shape
            except ScheduleError:
                raise
            except ValueError as exc:
                raise ModelArgsError(f"--model_args: {exc}") from None
            self.sparsify_p = table if st.schedule is not None else st.p
        self.realized = None  # moeprof.capture.Realized summed over every forward (None while dense)

    # -- the setting -----------------------------------------------------------------------------------------

    def set_sparsity(self, type: str | None, p: float | torch.Tensor | None, *, rule: str | None = None,
                     layers: Sequence[int] | None = None, experts: Sequence[int] | None = None) -> None:
        """Change the setting for the next evaluations (type=None or p=None: dense) and reset `realized`."""
        if type is not None and p is not None:  # the same checks as the constructor's (ScheduleError: a ValueError)
            from moeprof.schedule.apply import setting

            setting(type=type, rule=rule or self.sparsify_rule, p=p, layers=layers, experts=experts)
        was_type = None if self.is_dense else self.sparsify_type
        self.sparsify_type, self.sparsify_p = type, p
        if was_type is not None and (self.is_dense or type != was_type):  # its kernel weight copies are unused now
            from moeprof.kernels import release_kernel_copies

            release_kernel_copies(self.model)
        self.sparsify_rule = rule or self.sparsify_rule
        self.sparsify_layers, self.sparsify_experts = _int_list(layers), _int_list(experts)
        self.realized = None

    @property
    def is_dense(self) -> bool:
        """True when nothing is sparsified (no type or p set)."""
        return self.sparsify_type is None or self.sparsify_p is None

    @contextlib.contextmanager
    def _sparsified(self):
        if self.is_dense:
            yield
            return
        from moeprof.capture import sparsify

        with sparsify(self.model, type=self.sparsify_type, rule=self.sparsify_rule, p=self.sparsify_p,
                      layers=self.sparsify_layers, experts=self.sparsify_experts) as realized:
            yield
        self._add_realized(realized)

    def _add_realized(self, r) -> None:
        if self.realized is None:
            self.realized = type(r)(r.tokens.clone(), r.sparsity_sum.clone(), r.flops_per_token.clone())
        else:
            self.realized.tokens += r.tokens
            self.realized.sparsity_sum += r.sparsity_sum

    # -- what lm-eval reports -------------------------------------------------------------------------------

    def realized_summary(self) -> dict[str, Any]:
        """Return the setting and the sparsity it realized over every forward so far, as lm-eval's results keep
        them: moeprof_type / rule / p (a number, "schedule:<file>" or "per-expert table") and
        moeprof_realized_sparsity_token / _flop (None while dense or before any forward)."""
        p = self.sparsify_p
        if self.schedule is not None:
            p = f"schedule:{self._schedule_name}"
        elif isinstance(p, torch.Tensor):
            p = float(p) if p.numel() == 1 else "per-expert table"
        r = None if self.is_dense else self.realized

        def num(v) -> float | None:
            v = float(v)
            return None if math.isnan(v) else v

        return {"moeprof_type": None if self.is_dense else self.sparsify_type,
                "moeprof_rule": None if self.is_dense else self.sparsify_rule, "moeprof_p": p,
                "moeprof_realized_sparsity_token": None if r is None else num(r.token_weighted),
                "moeprof_realized_sparsity_flop": None if r is None else num(r.flop_weighted)}

    def get_model_info(self) -> dict:
        """Return HFLM's model info plus `realized_summary()`: lm-eval's `simple_evaluate` puts it into
        results["config"] after the run (so the JSON results say what p bought), and it is logged as one line."""
        info = super().get_model_info()
        summary = self.realized_summary()
        info.update(summary)
        if summary["moeprof_realized_sparsity_token"] is not None:
            logging.getLogger("lm_eval.models.moeprof").info(
                "moeprof: %s sparsified by %s at p = %s realized sparsity %.4f token-weighted, %.4f FLOP-weighted",
                summary["moeprof_type"], summary["moeprof_rule"], summary["moeprof_p"],
                summary["moeprof_realized_sparsity_token"], summary["moeprof_realized_sparsity_flop"])
        return info

    # -- the two places HFLM runs the model ------------------------------------------------------------------

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        with self._sparsified():
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        with self._sparsified():
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
