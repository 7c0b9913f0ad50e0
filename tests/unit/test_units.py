"""units: sizes are binary (1k = 1024), durations are seconds; anything negative, non-finite or boolean is refused."""
from __future__ import annotations

import pytest

from sandboxd.units import format_size, parse_duration, parse_size


@pytest.mark.parametrize("value, expected", [
    (0, 0),
    (1, 1),
    (1048576, 1 << 20),
    ("0", 0),
    ("4096", 4096),
    ("1k", 1024),
    ("1K", 1024),
    ("1KiB", 1024),
    ("1kb", 1024),
    ("64MiB", 64 << 20),
    ("64m", 64 << 20),
    ("1g", 1 << 30),
    ("1GiB", 1 << 30),
    ("2T", 2 << 40),
    ("1.5k", 1536),
    ("0.5MiB", 512 << 10),
    (" 1 MiB ", 1 << 20),
])
def test_parse_size_accepts(value, expected):
    assert parse_size(value) == expected
    assert isinstance(parse_size(value), int)


@pytest.mark.parametrize("value", [
    "", "   ", "abc", "MiB", "64 MB MB", "1x", "1kk", "1e6", "0x10", "1,5k", "--1", "1.k", ".5k",
    "-1", "-64MiB",
    -1, -(1 << 30),
    True, False,
    1.5, 1.0, float("nan"), None, [1], b"1k",
])
def test_parse_size_rejects(value):
    with pytest.raises(ValueError):
        parse_size(value)


def test_parse_size_error_quotes_the_value():
    with pytest.raises(ValueError, match="'12 parsecs'"):
        parse_size("12 parsecs")
    with pytest.raises(ValueError, match="-5"):
        parse_size(-5)


@pytest.mark.parametrize("value, expected", [
    (0, 0.0),
    (10, 10.0),
    (2.5, 2.5),
    ("10", 10.0),
    ("10s", 10.0),
    ("500ms", 0.5),
    ("2m", 120.0),
    ("1h", 3600.0),
    ("1.5m", 90.0),
    ("0.25s", 0.25),
    (" 3s ", 3.0),
])
def test_parse_duration_accepts(value, expected):
    result = parse_duration(value)
    assert isinstance(result, float)
    assert result == pytest.approx(expected)


@pytest.mark.parametrize("value", [
    float("nan"), float("inf"), float("-inf"), -1, -0.5,
    True, False,
    "", "s", "-1s", "10x", "10 seconds", "1d", "nan", "inf", "1e3", "10S", "1m30s",
    None, [10],
])
def test_parse_duration_rejects(value):
    with pytest.raises(ValueError):
        parse_duration(value)


def test_parse_duration_rejection_names_the_value():
    with pytest.raises(ValueError, match="non-negative"):
        parse_duration(-3)
    with pytest.raises(ValueError, match="'forever'"):
        parse_duration("forever")


@pytest.mark.parametrize("n, expected", [
    (0, "0"),
    (1, "1"),
    (1000, "1000"),
    (1024, "1KiB"),
    (1536, "1536"),
    (64 << 20, "64MiB"),
    ((1 << 20) + 1024, "1025KiB"),
    (1 << 30, "1GiB"),
    (3 << 30, "3GiB"),
    (1 << 40, "1024GiB"),
])
def test_format_size(n, expected):
    assert format_size(n) == expected


@pytest.mark.parametrize("n", [0, 1, 1023, 1024, 1536, 4 << 20, (1 << 20) + 1024, 5 << 30, 123456789])
def test_format_size_round_trips_through_parse_size(n):
    assert parse_size(format_size(n)) == n

