"""lm-eval-harness tasks on a wft model (PyTorch or llama.cpp), through one LM adapter.

Needs the optional `lm_eval` package; import this module only after `lm_eval_available()`.
Scoring follows lm-eval's own Hugging Face backend: context + continuation in one sequence,
the continuation's summed log-probability and whether every token is the greedy pick;
documents for perplexity in rolling windows of the model's context; greedy generation until
a stop string (found in the continuation only). Tokens are what wft trains on: no BOS is
added. `load_tasks` checks the tasks once, before any model runs: unknown names, and data
sets that cannot be loaded (offline, not on the Hub, local files missing), are user errors.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import yaml
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from transformers import StoppingCriteria, StoppingCriteriaList

from wftool.data.packing import IGNORE_INDEX, collate_examples, model_inputs
from wftool.errors import WftError

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

MAX_GEN_TOKS = 256  # lm-eval's default generation budget


class WftLM(TemplateLM):
    """`model` is a Hugging Face causal LM (a wft student runs its ternary forward) or a
    LlamaCppModel; `tokenizer` the matching Hugging Face or LlamaCppTokenizer."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int = 2048,
                 device: torch.device | str = "cpu"):
        super().__init__()
        if tokenizer.eos_token_id is None:
            raise WftError("lm-eval needs a tokenizer with an EOS token")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length, self._device = batch_size, max_length, device
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
            tokenizer.eos_token_id)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return type(self.tokenizer).__name__

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return list(self.tokenizer(string, add_special_tokens=False)["input_ids"])

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def loglikelihood(self, requests, disable_tqdm: bool = True):
        return super().loglikelihood(requests, disable_tqdm=True)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = True, **kwargs):
        """(sum of log p(continuation), all greedy) per (key, context ids, continuation ids)."""
        results = []
        for start in range(0, len(requests), self.batch_size):
            examples = []
            for _, context, continuation in requests[start : start + self.batch_size]:
                ids = (list(context) + list(continuation))[-(self.max_length + 1):]
                inputs = ids[:-1]
                # targets[i] is the token inputs[i] predicts; only the continuation counts.
                targets = [IGNORE_INDEX] * (len(inputs) - len(continuation)) + list(continuation)
                examples.append((inputs, targets))
            batch = {k: v.to(self._device) for k, v in collate_examples(examples, self.pad).items()}
            logits = self.model(**model_inputs(batch)).logits.float()
            logprobs = F.log_softmax(logits, dim=-1)
            for row, target in enumerate(batch["labels"]):
                keep = target.ne(IGNORE_INDEX)
                picked, wanted = logprobs[row][keep], target[keep]
                total = float(picked.gather(-1, wanted[:, None]).sum())
                results.append((total, bool(picked.argmax(-1).eq(wanted).all())))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = True) -> list[float]:
        """Total log-likelihood of each document, in disjoint windows of `max_length`."""
        totals = []
        for (text,) in [request.args for request in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, c, t) for c, t in windows])
            totals.append(sum(score for score, _ in scores))
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = True) -> list[str]:
        """Greedy generation (sampling settings are ignored) cut at the first stop string."""
        outputs = []
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        for context, gen_kwargs in [request.args for request in requests]:
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", MAX_GEN_TOKS))
            ids = self.tok_encode(context)[-max(self.max_length - max_new, 1):] or [
                self.prefix_token_id]
            input_ids = torch.tensor([ids], device=self._device)
            stops = [s for s in until if s]
            criteria = StoppingCriteriaList(
                [_StopInContinuation(self.tokenizer, stops, len(ids))] if stops else [])
            out = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new, do_sample=False, eos_token_id=self.eot_token_id,
                pad_token_id=self.pad, stopping_criteria=criteria)
            text = self.tok_decode(out[0, len(ids):].tolist(), skip_special_tokens=False)
            for stop in [*stops, eos_text]:
                if stop:  # an EOS may decode to "" (a control token), and "".split fails
                    text = text.split(stop)[0]
            outputs.append(text)
        return outputs


class _StopInContinuation(StoppingCriteria):
    """Done once a stop string is in the generated text. Hugging Face's `stop_strings` also
    match a string that begins in the context ("oo" after "povo" + "o"), which lm-eval's own
    backend never does: stops apply to the continuation."""

    def __init__(self, tokenizer, stops: list[str], start: int):
        self.tokenizer, self.stops, self.start = tokenizer, stops, start

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        done = [any(stop in self.tokenizer.decode(row[self.start:].tolist()) for stop in
                    self.stops) for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def task_names(tasks: list[str]) -> tuple[list[str], list[str]]:
    """(task names, folders to search): a `.yaml` item is a local task (or group) file, named
    by its `task:` (or `group:`) key; other items are names of lm-eval's tasks or groups."""
    names, folders = [], []
    for item in tasks:
        path = Path(item).expanduser()
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise WftError(f"--lm-eval {item}: no such task file")
            name = _yaml_task_name(path.read_text())
            if not name:
                raise WftError(f"--lm-eval {item}: the task file has no `task:` name")
            names.append(name)
            folders.append(str(path.resolve().parent))
        else:
            names.append(item)
    return names, sorted(set(folders))


def _yaml_task_name(text: str) -> str | None:
    """A task file's `task:` name; a group file's `group:` (its `task:` lists the members)."""
    try:
        config = yaml.safe_load(text) or {}
    except yaml.YAMLError:  # lm-eval's own YAML tags (!function) are not plain YAML
        config = {}
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key in ("task", "group") and value.strip():
                config.setdefault(key, value.strip().strip("'\""))
    task, group = config.get("task"), config.get("group")
    name = task if isinstance(task, str) else group
    return str(name) if name else None


@dataclass
class LmEvalTasks:
    """The tasks --lm-eval names, checked: every name known, every data set loadable."""

    names: list[str]
    manager: TaskManager  # indexed once, for every model


def load_tasks(tasks: list[str]) -> LmEvalTasks:
    """Check the tasks before any model runs: an unknown name, or a data set that cannot be
    downloaded, is the user's to fix, not a traceback after the first model's numbers.
    Building a task loads its data set (from the datasets cache, or the Hub)."""
    import datasets
    from lm_eval.tasks import TaskManager

    datasets.disable_progress_bars()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    names, folders = task_names(tasks)
    manager = TaskManager(include_path=folders or None)
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            guess = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise WftError(f"--lm-eval {name}: lm-eval has no such task{guess}",
                           "`lm-eval ls tasks` lists them; a local task is a path to its .yaml")
    checked = LmEvalTasks(names, manager)
    _built(checked)
    return checked


def _built(tasks: LmEvalTasks) -> list:
    """lm-eval's task and group objects, built one name at a time so that a data set that
    cannot be loaded is reported with the task that needs it."""
    built, named_by = [], {}
    for name in tasks.names:
        try:
            loaded = tasks.manager.load(name)
        except (OSError, TimeoutError, *_transport_errors()) as err:
            raise _data_set_error(name, err) from None
        for task in loaded["tasks"]:  # lm-eval refuses a task reached twice
            if named_by.setdefault(task, name) != name:
                raise WftError(f"--lm-eval: task {task!r} is in both {named_by[task]!r} and "
                               f"{name!r}", "name each task once")
        top = loaded["groups"].get(name, loaded["tasks"].get(name))
        built.extend([top] if top is not None else loaded["tasks"].values())  # a tag: its tasks
    return built


def _transport_errors() -> tuple[type, ...]:
    """httpx's connection and timeout errors (huggingface_hub uses httpx, or its fork httpx2)."""
    errors = []
    for module in ("httpx", "httpx2"):
        try:
            errors.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _data_set_error(name: str, err: Exception) -> WftError:
    """A WftError for a task whose data set cannot be loaded: the Hub cannot be reached, the
    data set is not on it (or is gated), or a local task's files are missing."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    chain, cause = [], err
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    unreachable = (ConnectionError, TimeoutError, LocalEntryNotFoundError, *_transport_errors())
    if any(isinstance(e, unreachable) for e in chain):
        offline = " (HF_HUB_OFFLINE=1 is set)" if constants.HF_HUB_OFFLINE else ""
        return WftError(
            f"--lm-eval {name}: the task's data set must be downloaded from the Hugging Face "
            f"Hub, which cannot be reached{offline}: {detail}",
            "run it once with network access (the data set is then cached), set "
            "HF_DATASETS_CACHE to a cache that holds it, or use a local task .yaml whose "
            "dataset_path is local (e.g. `dataset_path: json` with `data_files`)")
    return WftError(f"--lm-eval {name}: cannot load the task's data set: {detail}",
                    "a Hub data set may be gated (log in or set HF_TOKEN) or renamed; a local "
                    "task's dataset_path and data_files must exist")


def run_lm_eval(model, tokenizer, tasks: LmEvalTasks, limit: int | None = None,
                batch_size: int = 8, max_length: int = 2048,
                device: torch.device | str = "cpu") -> dict[str, float]:
    """{"task:metric": value} for every task (from `load_tasks`): lm-eval's metrics, without
    their stderr; a filter other than `none` is named in brackets (`exact_match[strict-match]`).
    Every model gets freshly built tasks, as a run of lm-eval of its own would."""
    from lm_eval import simple_evaluate

    lm = WftLM(model, tokenizer, batch_size, max_length, device)
    output = simple_evaluate(model=lm, tasks=_built(tasks), task_manager=tasks.manager,
                             limit=limit, log_samples=False, bootstrap_iters=0)
    scores = {}
    for task, metrics in (output or {}).get("results", {}).items():
        for key, value in metrics.items():
            metric, _, which = key.partition(",")
            if metric == "sample_len":
                scores[f"{task}:n"] = float(value)
                continue
            if metric == "alias" or metric.endswith("_stderr") or not isinstance(
                    value, (int, float)):
                continue
            name = metric if which in ("", "none") else f"{metric}[{which}]"
            scores[f"{task}:{name}"] = float(value)
    return scores
