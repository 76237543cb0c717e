"""Command-line value types shared by train.py and eval.py."""
import argparse


def str2bool(text):
    """Published boolean flags take a value: `--weight_std True`, `--random_mirror=False`.

    Accepts (any case, surrounding spaces ignored) true/t/yes/y/1 and false/f/no/n/0, or a
    bool (a default from a JSON config). Anything else is an argparse error.
    """
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("true", "t", "yes", "y", "1"):
        return True
    if value in ("false", "f", "no", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True or False), got {text!r}")
