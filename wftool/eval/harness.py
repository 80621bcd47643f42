"""lm-eval-harness tasks on a wft model (PyTorch or llama.cpp), through one LM adapter.

Needs the optional `lm_eval` package; import this module only after `lm_eval_available()`.
Scoring follows lm-eval's own Hugging Face backend: context + continuation in one sequence,
the continuation's summed log-probability and whether every token is the greedy pick;
documents for perplexity in rolling windows of the model's context; greedy generation until
a stop string. Tokens are what wft trains on: no BOS is added.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from wftool.data.packing import IGNORE_INDEX, collate_examples, model_inputs
from wftool.errors import WftError

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
            out = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new, do_sample=False, eos_token_id=self.eot_token_id,
                pad_token_id=self.pad, stop_strings=stops or None,
                tokenizer=self.tokenizer if stops else None)
            text = self.tok_decode(out[0, len(ids):].tolist(), skip_special_tokens=False)
            for stop in [*stops, eos_text]:
                if stop:  # an EOS may decode to "" (a control token), and "".split fails
                    text = text.split(stop)[0]
            outputs.append(text)
        return outputs


def task_names(tasks: list[str]) -> tuple[list[str], list[str]]:
    """(task names, folders to search): a `.yaml` item is a local task file, named by its
    `task:` key; other items are names of lm-eval's own tasks or groups."""
    names, folders = [], []
    for item in tasks:
        path = Path(item).expanduser()
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise WftError(f"--lm-eval {item}: no such task file")
            try:
                name = (yaml.safe_load(path.read_text()) or {}).get("task")
            except yaml.YAMLError:
                name = None  # lm-eval's own YAML tags (!function) are not plain YAML
                for line in path.read_text().splitlines():
                    if line.startswith("task:"):
                        name = line.split(":", 1)[1].strip().strip("'\"")
            if not name:
                raise WftError(f"--lm-eval {item}: the task file has no `task:` name")
            names.append(str(name))
            folders.append(str(path.resolve().parent))
        else:
            names.append(item)
    return names, sorted(set(folders))


def run_lm_eval(model, tokenizer, tasks: list[str], limit: int | None = None,
                batch_size: int = 8, max_length: int = 2048,
                device: torch.device | str = "cpu") -> dict[str, float]:
    """{"task:metric": value} for every task: lm-eval's metrics, without their stderr; a
    filter other than `none` is named in brackets (`exact_match[strict-match]`)."""
    import datasets
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    datasets.disable_progress_bars()
    names, folders = task_names(tasks)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    manager = TaskManager(include_path=folders or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise WftError(f"lm-eval has no task {unknown[0]!r}",
                       "`lm-eval ls tasks` lists them; a local task is a path to its .yaml")
    lm = WftLM(model, tokenizer, batch_size, max_length, device)
    output = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                             log_samples=False, bootstrap_iters=0)
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
