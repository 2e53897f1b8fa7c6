"""Command-line conventions shared by the root scripts (main.py, evaluation_*.py, export_model.py, tools/).

Exit status: 0 done; 2 bad input or usage (one `error: ...` line on stderr, never a traceback); 1 a run that
started and failed on its own terms (export verification, a diverging loss); 130 interrupted (Ctrl-C).
search/ keeps its own copy of `fail` (search/api.py) because it ships without the rest of the repo.

    from cli import fail, HelpFormatter
    fail(f"{path}: no such file")           # prints `error: <path>: no such file` on stderr, exits 2
"""
import argparse
import sys

EXIT_USAGE = 2


def fail(msg, code=EXIT_USAGE):
    """One `error: ...` line on stderr, then SystemExit(code)."""
    text = str(msg)
    if text.startswith("error: "):
        text = text[len("error: "):]
    print(f"error: {text}", file=sys.stderr, flush=True)
    raise SystemExit(code)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """-h shows every flag's default, and the module docstring (exact commands) keeps its line breaks."""
