import pytest

from revify.units import format_bytes, format_flops, parse_bytes


@pytest.mark.parametrize("text,expected", [("6GiB", 6 * 2**30), ("512 MB", 512 * 10**6), ("1.5kib", 1536),
                                           (4096, 4096), ("2e3", 2000), ("3G", 3 * 2**30)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["0.5", 0.3, "six GiB", "-1GiB", "5 parsecs", True, 0])
def test_parse_bytes_refuses_with_reason(bad):
    with pytest.raises(ValueError, match="byte|fraction|positive"):
        parse_bytes(bad)


def test_format_bytes_round_trip():
    assert format_bytes(6 * 2**30) == "6.00 GiB"
    assert parse_bytes(format_bytes(6 * 2**30).replace(" ", "")) == 6 * 2**30


def test_format_flops():
    assert format_flops(0) == "0 FLOP"
    assert format_flops(8_388_608) == "8.39 MFLOP"
    assert format_flops(89.39e9) == "89.39 GFLOP"
    assert format_flops(2.5e12) == "2.50 TFLOP"
