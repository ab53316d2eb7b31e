"""argparse types shared by the command-line subcommands."""

import argparse


def positive_int(text: str) -> int:
    """An integer >= 1, or an argparse error that says what was given."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An integer >= 0, or an argparse error that says what was given."""
    return _int_at_least(text, 0, "an integer >= 0")


def _int_at_least(text: str, least: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value
