"""The one rule every command-line tool and launcher follows for errors.

A user error (bad config, missing file, locked run directory, a diverged run) is printed as one line
``error: <message>`` on stderr, exit code 2, no traceback: the message already names the file, key or flag to
change. ``--debug`` anywhere on the command line (before a ``--``) re-raises it with its traceback. Any other
exception is a bug and keeps its traceback.

    def run(argv: list[str] | None) -> int: ...          # parse argv with `parser(__doc__)`, do the work
    def main(argv: list[str] | None = None) -> int:
        return run_cli(run, argv)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from selmix_dist.atomic import StorageError
from selmix_dist.train.lock import RunLockedError

__all__ = ["DEBUG_FLAG", "USER_ERRORS", "key_value", "parser", "run_cli"]

DEBUG_FLAG = "--debug"
# Config, data and path problems the user can act on. FloatingPointError: a run whose loss or head became
# non-finite (NonFiniteStateError), whose message says which knob to turn; FileExistsError: a refusal to
# overwrite, which names the flag that allows it; StorageError: a full or read-only disk, naming the file and the
# free space. Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, RunLockedError,
                                                 FloatingPointError, StorageError)


def parser(doc: str | None, **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser whose description is the tool's docstring (usage examples kept as written), with
    the `--debug` flag listed (`run_cli` acts on it before the tool's own parsing)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
    p.add_argument(DEBUG_FLAG, action="store_true", help="show the full traceback of an error")
    return p


def key_value(text: str) -> tuple[str, object]:
    """argparse type of a repeatable KEY=VALUE option; VALUE is parsed as JSON when it is JSON (numbers,
    true/false, lists), else kept as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def run_cli(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """`main(argv)`'s exit code; a user error becomes `error: ...` on stderr and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    end = argv.index("--") if "--" in argv else len(argv)
    debug = DEBUG_FLAG in argv[:end]
    if debug:
        argv.remove(DEBUG_FLAG)
    try:
        return int(main(argv) or 0)
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        print(f"(run with {DEBUG_FLAG} for the traceback)", file=sys.stderr)
        return 2
