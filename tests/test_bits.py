import pytest

from benchsuite.bits import SUPPORTED_BITS, BitSpec, parse_bits_list
from benchsuite.errors import BenchsuiteError, BitSpecError


@pytest.mark.parametrize(
    "text, w, a",
    [("w4a4", 4, 4), ("w3a3", 3, 3), ("w6a6", 6, 6), ("w8a8", 8, 8), ("w4a8", 4, 8), ("W4A4", 4, 4), (" w6a6 ", 6, 6)],
)
def test_parse_accepts_the_papers_settings(text, w, a):
    spec = BitSpec.parse(text)
    assert (spec.w_bits, spec.a_bits) == (w, a)
    assert spec.name == text.strip().lower()
    assert not spec.is_float


@pytest.mark.parametrize("text", ["fp", "FP", "fp32", "float"])
def test_parse_float(text):
    spec = BitSpec.parse(text)
    assert spec.is_float and spec.name == "fp" and str(spec) == "fp"


@pytest.mark.parametrize("text", ["w2a2", "w4a44", "4/4", "", "w4", "a4w4", "w4a4x", "int8", "w16a16", "w8a4"])
def test_parse_rejects_everything_else_with_the_choices(text):
    with pytest.raises(BitSpecError) as info:
        BitSpec.parse(text)
    assert isinstance(info.value, BenchsuiteError)
    assert "w4a4" in str(info.value)


def test_list_keeps_order_and_drops_repeats():
    assert [s.name for s in parse_bits_list("w6a6,w4a4,w6a6")] == ["w6a6", "w4a4"]
    with pytest.raises(BitSpecError):
        parse_bits_list(" , ")


def test_sort_key_follows_supported_order():
    specs = sorted((BitSpec.parse(b) for b in reversed(SUPPORTED_BITS)), key=lambda s: s.sort_key)
    assert [s.name for s in specs] == list(SUPPORTED_BITS)
