import pytest
import torch

from actsparse import ActsparseError
from actsparse.pieces.criteria import CRITERIA, robust_column_norms

X = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 0.5, 1.0]])
W = torch.tensor([[1.0, 0.0, 2.0], [-1.0, 3.0, 2.0]])  # (out=2, in=3)


def score(name):
    criterion = CRITERIA.get(name)
    factor = criterion.weight_factor(W) if criterion.weight_factor else None
    return criterion.score(X, factor)


def test_magnitude_is_the_absolute_value():
    assert torch.equal(score("magnitude"), X.abs())


def test_wina_weights_by_the_column_l2_norm():
    column_norms = torch.tensor([2**0.5, 3.0, 8**0.5])
    torch.testing.assert_close(score("wina"), X.abs() * column_norms)


def test_variance_weights_by_the_population_variance_of_each_column():
    variances = torch.tensor([1.0, 2.25, 0.0])  # columns (1,-1), (0,3), (2,2)
    torch.testing.assert_close(score("variance"), X.abs() * variances)


def test_clact_uses_column_norm_over_tokens_and_row_norm():
    column = torch.tensor([17**0.5, 4.25**0.5, 10**0.5])
    row = torch.tensor([[14**0.5], [17.25**0.5]])
    torch.testing.assert_close(score("clact"), X.abs() * column / row)


def test_amber_robust_norm_by_hand():
    # 200 ordinary values and one huge outlier: clipping at the 0.5%/99.5% quantiles tames it.
    w = torch.arange(1.0, 201.0).reshape(20, 10)
    w[0, 0] = 1e6
    flat = w.flatten().sort().values
    low, high = flat[round(0.005 * 199)], flat[round(0.995 * 199)]
    clipped = w.clamp(low, high)
    standardised = (clipped - clipped.mean()) / clipped.std()
    norms = standardised.norm(dim=0)
    torch.testing.assert_close(robust_column_norms(w), norms / norms.min())
    assert robust_column_norms(w).min() == 1.0
    assert robust_column_norms(w).max() < 2  # the outlier did not dominate column 0


def test_every_criterion_has_a_positive_score_for_nonzero_inputs():
    for name in CRITERIA:
        criterion = CRITERIA.get(name)
        w = torch.tensor([[1.0, 0.0, 2.0], [-1.0, 3.0, 2.5]])
        factor = criterion.weight_factor(w) if criterion.weight_factor else None
        assert (criterion.score(X, factor) > 0).all(), name


def test_unknown_criterion_lists_the_known_ones():
    with pytest.raises(
        ActsparseError, match="Unknown criterion 'topk'; choose one of magnitude, wina, amber"
    ):
        CRITERIA.get("topk")
