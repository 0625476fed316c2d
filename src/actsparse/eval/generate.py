"""Generation agreement: greedy continuations of the sparse model against the dense model's.

Prompts are cut from the evaluation split (``actsparse.io.text.token_windows``); sparsity applies to the prompt (prefill) and, under
``phase="all"``, to the decode steps as well. For each prompt: how many tokens are identical before
the first divergence, and the ROUGE-L F1 of the two continuations (longest common subsequence over
tokens).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from actsparse.core.devices import input_device
from actsparse.eval.variants import Prepared


def common_prefix(a: list[int], b: list[int]) -> int:
    """Number of leading tokens ``a`` and ``b`` share."""
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def rouge_l(reference: list[int], candidate: list[int]) -> float:
    """ROUGE-L F1 of two token sequences: ``2·LCS / (len(reference) + len(candidate))``."""
    if not reference or not candidate:
        return float(reference == candidate)
    previous = [0] * (len(candidate) + 1)
    for token in reference:
        current = [0]
        for j, other in enumerate(candidate):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return 2 * previous[-1] / (len(reference) + len(candidate))


@dataclass(frozen=True)
class GenerationAgreement:
    """Agreement of the sparse model's greedy continuations with the dense model's."""

    prompts: int
    new_tokens: int
    mean_common_prefix: float
    mean_rouge_l: float
    identical_share: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _continuation(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    prompt = prompt.to(input_device(model))
    output = model.generate(
        prompt[None],
        attention_mask=torch.ones_like(prompt)[None],
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return output[0, prompt.numel() :].tolist()


def generation_agreement(
    model: nn.Module,
    handle: Prepared,
    prompts: torch.Tensor,
    new_tokens: int = 32,
    progress: bool = True,
) -> GenerationAgreement:
    """Greedy ``new_tokens``-token continuations of every prompt, dense and with ``handle``
    attached; the model is left as it was found (the handle detached)."""
    handle.remove()
    prefixes, rouges = [], []
    with torch.inference_mode():
        for prompt in tqdm(prompts, desc="generating", unit="prompt", disable=not progress, leave=False):
            dense = _continuation(model, prompt, new_tokens)
            with handle:
                sparse = _continuation(model, prompt, new_tokens)
            prefixes.append(common_prefix(dense, sparse))
            rouges.append(rouge_l(dense, sparse))
    count = len(prompts)
    return GenerationAgreement(
        prompts=count,
        new_tokens=new_tokens,
        mean_common_prefix=sum(prefixes) / count,
        mean_rouge_l=sum(rouges) / count,
        identical_share=sum(p == new_tokens for p in prefixes) / count,
    )


def evaluate_generation(
    model: nn.Module, handles: list[Prepared], prompts: torch.Tensor, new_tokens: int = 32
) -> list[GenerationAgreement]:
    """``generation_agreement`` of every prepared variant with the dense model, on the same prompts."""
    return [generation_agreement(model, handle, prompts, new_tokens) for handle in handles]
