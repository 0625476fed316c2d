import pytest

from actsparse import ActsparseError, SparsityConfig
from actsparse.eval.baselines import WeightPruningConfig
from actsparse.eval.variants import parse_variant, read_variants
from actsparse.pieces.policies import Budget


def test_activation_variant_with_defaults():
    variants = parse_variant("pattern=8:16 criterion=amber policy=budget flop_share=0.6", {"phase": "all"})
    assert variants == [
        SparsityConfig(pattern="8:16", criterion="amber", policy=Budget(flop_share=0.6), phase="all")
    ]


def test_comma_separated_values_give_one_variant_each():
    variants = parse_variant("pattern=2:4,8:16 corrections=none,shift+var")
    assert [v.label for v in variants] == [
        "2:4 amber",
        "2:4 amber shift+var",
        "8:16 amber",
        "8:16 amber shift+var",
    ]


def test_an_inherited_piece_setting_only_reaches_pieces_that_have_it():
    (plain,) = parse_variant("pattern=8:16 policy=all", {"flop_share": "0.6"})
    assert plain.policy.name == "all"
    with pytest.raises(
        ActsparseError, match="flop_share is a setting of the amber policy and the budget policy"
    ):
        parse_variant("pattern=8:16 policy=all flop_share=0.6")


def test_weight_variant():
    (variant,) = parse_variant("weights=sparsegpt pattern=2:4 exclude=down_proj", {"phase": "all"})
    assert variant == WeightPruningConfig(method="sparsegpt", pattern="2:4", exclude=("down_proj",))
    assert variant.label == "weights 2:4 sparsegpt"


def test_file_of_variants(tmp_path):
    path = tmp_path / "variants.txt"
    path.write_text("# rows\npattern=dense quant=w8a8\n\npattern=2:4 criterion=magnitude  # naive\n")
    assert [v.label for v in read_variants(path)] == ["dense w8a8", "2:4 magnitude"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("pattern 8:16", "is not key=value"),
        ("pattern=8:16 colour=red", "Unknown setting"),
        ("flop_share=lots", "needs a number"),
        ("pattern=9:8", "keeps 9 of 8"),
    ],
)
def test_bad_variants(spec, message):
    with pytest.raises(ActsparseError, match=message):
        parse_variant(spec)


def test_missing_variants_file(tmp_path):
    with pytest.raises(ActsparseError, match="does not exist"):
        read_variants(tmp_path / "none.txt")


def test_something_that_is_no_kind_of_variant_is_refused(llama):
    from actsparse.eval.variants import attach_variant

    with pytest.raises(
        ActsparseError, match="A variant is one of SparsityConfig, WeightPruningConfig, Recipe"
    ):
        attach_variant(llama, "pattern=2:4")
