"""Tiny random transformers models for unit tests (no download, a fraction of a second to build)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in Triton's CPU interpreter here; it must be chosen before Triton loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

SMALL = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


@pytest.fixture(autouse=True)
def measurements_store(tmp_path, monkeypatch) -> Path:
    """Measurements kept across runs go to a folder of each test's own, never the user's cache."""
    import actsparse.calibration.measure

    folder = tmp_path / "measurements"
    monkeypatch.setattr(actsparse.calibration.measure, "measurements_dir", lambda: folder)
    return folder


@pytest.fixture
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMALL)).eval()


@pytest.fixture
def qwen2() -> Qwen2ForCausalLM:
    """Qwen2 has biases on q, k and v: a layer replacement must keep them."""
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**SMALL)).eval()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, SMALL["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))


WORDS = [a + b + c for a in "bdfgklmnprst" for b in "aeiou" for c in "bdgkmnprst"][:120]
"""Vocabulary of the tiny tokenizer: letter-only words (bab, bad, ...), so sentences can end in one."""


@pytest.fixture
def local_model(llama, tmp_path):
    """A tiny model folder with a word-level tokenizer, and a text file in its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = WORDS
    tokenizer = Tokenizer(
        models.WordLevel({"<unk>": 0, "<s>": 1, ".": 2, **{w: i + 3 for i, w in enumerate(words)}}, "<unk>")
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", unk_token="<unk>").save_pretrained(
        tmp_path / "m"
    )
    llama.save_pretrained(tmp_path / "m")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(words[i % 97] + ("." if i % 10 == 9 else "") for i in range(2000)))
    return tmp_path / "m", text
