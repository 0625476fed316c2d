import pytest

from actsparse import ActsparseError, SparsityConfig
from actsparse.baselines import WeightPruningConfig
from actsparse.variants import parse_variant, read_variants


def test_activation_variant_with_defaults():
    variant = parse_variant("pattern=8:16 criterion=amber policy=budget flop_share=0.6", {"phase": "all"})
    assert variant == SparsityConfig(
        pattern="8:16", criterion="amber", policy="budget", flop_share=0.6, phase="all"
    )


def test_weight_variant():
    variant = parse_variant("weights=sparsegpt pattern=2:4 exclude=down_proj", {"phase": "all"})
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
