import pytest

from actsparse import ActsparseError, parse_pattern


def test_nm_pattern_keeps_n_of_m():
    pattern = parse_pattern("8:16")
    assert (pattern.n, pattern.m, pattern.density) == (8, 16, 0.5)
    assert str(pattern) == "8:16"


def test_unstructured_pattern_keeps_a_share_of_the_row():
    pattern = parse_pattern("unstructured:0.25")
    assert pattern.unstructured and pattern.density == 0.25
    assert pattern.keep_count(64) == (16, 64)
    assert str(pattern) == "unstructured:0.25"


def test_spaces_are_allowed():
    assert str(parse_pattern(" 2 : 4 ")) == "2:4"


@pytest.mark.parametrize(
    "text, message",
    [
        ("5:4", "1 <= N <= M"),
        ("0:4", "1 <= N <= M"),
        ("2-4", "not understood"),
        ("unstructured:1.5", "density in (0, 1]"),
        ("unstructured:0", "density in (0, 1]"),
    ],
)
def test_bad_patterns_are_refused_with_the_fix(text, message):
    with pytest.raises(
        ActsparseError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")
    ):
        parse_pattern(text)
