"""Length parsing and formatting."""

import pytest

from l2a.evaluation.common import format_length, parse_length, parse_lengths


@pytest.mark.parametrize(
    ("text", "value"),
    [("4k", 4096), ("16K", 16384), ("512", 512), (" 8k ", 8192), ("1m", 1 << 20), (300, 300)],
    ids=str,
)
def test_parse_length(text, value):
    assert parse_length(text) == value


@pytest.mark.parametrize("text", ["", "4kb", "k", "-4k", "0", "1.5k"])
def test_parse_length_rejects(text):
    with pytest.raises(ValueError):
        parse_length(text)


def test_parse_lengths_and_format():
    assert parse_lengths("4k,8k,512,4K") == [4096, 8192, 512]
    assert [format_length(n) for n in (4096, 1 << 20, 1000)] == ["4K", "1M", "1000"]
    with pytest.raises(ValueError, match="no lengths"):
        parse_lengths(",")
