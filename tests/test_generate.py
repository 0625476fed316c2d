"""Generation agreement: the metrics on hand examples, and a run on a tiny model."""

import pytest

from actsparse import SparsityConfig, sparsify
from actsparse.eval.generate import common_prefix, generation_agreement, rouge_l


def test_common_prefix_by_hand():
    assert common_prefix([5, 6, 7, 8], [5, 6, 9, 8]) == 2
    assert common_prefix([5, 6], [5, 6]) == 2
    assert common_prefix([1], [2]) == 0


def test_rouge_l_by_hand():
    # LCS of [1, 2, 3, 4] and [1, 3, 4, 5] is [1, 3, 4]: F1 = 2·3 / (4 + 4)
    assert rouge_l([1, 2, 3, 4], [1, 3, 4, 5]) == pytest.approx(0.75)
    assert rouge_l([1, 2, 3], [1, 2, 3]) == 1.0
    assert rouge_l([1, 2], [3, 4, 5]) == 0.0
    # LCS of [7, 1, 7, 2] and [1, 2, 7]: [1, 2] or [1, 7] → 2·2 / 7
    assert rouge_l([7, 1, 7, 2], [1, 2, 7]) == pytest.approx(4 / 7)


def test_a_model_agrees_with_itself(llama, tokens):
    handle = sparsify(llama, SparsityConfig(pattern="dense"))
    agreement = generation_agreement(llama, handle, tokens[:, :8], new_tokens=6, progress=False)
    assert agreement.identical_share == 1.0 and agreement.mean_rouge_l == 1.0
    assert agreement.mean_common_prefix == 6 and agreement.prompts == 2
    assert not handle.attached


def test_sparse_decoding_changes_the_continuation(llama, tokens):
    handle = sparsify(llama, SparsityConfig(pattern="1:4", criterion="magnitude", phase="all"))
    agreement = generation_agreement(llama, handle, tokens[:, :8], new_tokens=6, progress=False)
    assert agreement.mean_rouge_l < 1.0 and agreement.identical_share < 1.0
