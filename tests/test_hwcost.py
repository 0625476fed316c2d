"""Hardware cost of a pattern against hand counts."""

import pytest

from actsparse import ActsparseError
from actsparse.eval.hwcost import hardware_cost


@pytest.mark.parametrize(
    "pattern, combinatorial, positional, fp16, int8",
    [
        # C(4, 2) = 6 → 3 bits; 2 positions of 2 bits. Per group fp16: 2·16 + 3 bits of 4·16.
        ("2:4", 3, 4, (32 + 3) / 64, (16 + 3) / 32),
        # C(16, 8) = 12870 → 14 bits; 8 positions of 4 bits.
        ("8:16", 14, 32, (128 + 14) / 256, (64 + 14) / 128),
        # C(32, 16) = 601080390 → 30 bits; 16 positions of 5 bits.
        ("16:32", 30, 80, (256 + 30) / 512, (128 + 30) / 256),
    ],
)
def test_hand_counts(pattern, combinatorial, positional, fp16, int8):
    cost = hardware_cost(pattern, tokens=512, channels=4096)
    assert cost.index_bits_per_group == combinatorial
    assert cost.positional_index_bits_per_group == positional
    assert cost.io_ratio_fp16 == pytest.approx(fp16) and cost.io_ratio_int8 == pytest.approx(int8)
    assert cost.dense_bytes_fp16 == 512 * 4096 * 2 and cost.dense_bytes_int8 == 512 * 4096
    n, m = map(int, pattern.split(":"))
    assert cost.positional_io_ratio_fp16 == pytest.approx((n * 16 + positional) / (m * 16))


def test_bytes_round_up_per_token():
    # One token, 4 inputs at 2:4 in int8: 2 bytes of values and 3 index bits → 3 bytes.
    assert hardware_cost("2:4", tokens=1, channels=4).compressed_bytes_int8 == 3


def test_unstructured_uses_a_bitmap():
    cost = hardware_cost("unstructured:0.5", tokens=1, channels=16)
    assert cost.index_bits_per_group is None
    assert cost.compressed_bytes_fp16 == 8 * 2 + 2  # 8 values of 2 bytes, 16 bits of bitmap


def test_channels_must_split_into_groups():
    with pytest.raises(ActsparseError, match="multiple of M"):
        hardware_cost("8:16", channels=100)
