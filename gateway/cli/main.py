"""The ``image-gateway`` command: serve, new-key, check-config, usage, ledger, upstreams, results.
The only reader of argv. Every failure a user can cause ends in one line on stderr and exit
status 1."""

from __future__ import annotations

import os
import sys

from gateway.cli.commands import CommandError, parser

PIPE_CLOSED = 128 + 13  # what a shell reports for a command ended by SIGPIPE (`... | head`)


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:  # here, not at exit: a reader that went away is then still ours to handle
            sys.stdout.flush()
    except BrokenPipeError:  # `image-gateway ledger export ... | head`: the reader has enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return PIPE_CLOSED


def _main(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except CommandError as exc:
        print(f"image-gateway: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
