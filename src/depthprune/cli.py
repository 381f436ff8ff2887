"""The ``depthprune`` command line: global flags, subcommand discovery, error handling.

Each subcommand lives in its own module of :mod:`depthprune.commands`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import pkgutil
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import NoReturn

from depthprune import __version__, commands
from depthprune.errors import DepthPruneError, UsageError

# Subcommands in the order of the pipeline; modules not listed come after, by name.
ORDER = ("convert", "score", "shapley", "plan", "prune", "recover", "eval", "sweep", "run", "demo", "testbed")


def _command_modules() -> list[str]:
    names = [m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")]
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {"time": self.formatTime(record), "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        )


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line, not the usage text.

    Sub-parsers are made of the parser's own class, so every subcommand inherits this.
    """

    def error(self, message: str) -> NoReturn:
        """Raise :class:`UsageError` (``main`` prints it as one line, exit code 2)."""
        raise UsageError(f"{self.prog}: {message}; see '{self.prog} --help'")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="depthprune",
        description="Score, remove and repair whole layers of decoder LLMs.",
    )
    parser.add_argument("--version", action="version", version=f"depthprune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, only warnings and errors")
    parser.add_argument("--log-json", action="store_true", help="write log records as JSON lines on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _command_modules():
        importlib.import_module(f"{commands.__name__}.{name}").register(sub)
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if args.log_json else logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("depthprune")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if args.verbose and not args.quiet else logging.WARNING)
    root.propagate = False
    if not args.verbose:
        # huggingface_hub logs every retry of an unreachable hub; the error that follows
        # says what went wrong in one line.
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    if args.quiet or not sys.stderr.isatty():
        # transformers draws its loading/saving bars even when stderr is a file.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


GLOBAL_FLAGS = ("-q", "--quiet", "-v", "--verbose", "--log-json")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse a command line; global flags may also be written after the subcommand.

    They are moved in front of it, so no subcommand may define a flag of the same name:
    its default would overwrite the global value (``eval --quiet`` once did).
    """
    argv = [a for a in argv if a in GLOBAL_FLAGS] + [a for a in argv if a not in GLOBAL_FLAGS]
    return build_parser().parse_args(argv)


@contextlib.contextmanager
def _rank_stdout(rank: int) -> Iterator[None]:
    """Under torchrun only rank 0 prints results; other ranks' stdout is discarded."""
    if rank == 0:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


def _no_kill_on_file_size_limit() -> None:
    """Past a file size limit (``ulimit -f``) the kernel kills the process with SIGXFSZ;
    ignored, the write fails with EFBIG instead, which the writers report in one line."""
    if hasattr(signal, "SIGXFSZ"):
        with contextlib.suppress(ValueError):  # not the main thread: leave it
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code (2 for bad input, with one line on stderr)."""
    try:
        args = parse_args(list(sys.argv[1:] if argv is None else argv))
    except UsageError as exc:
        print(f"depthprune: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    from depthprune.distributed import env_world_size, init_from_env

    if env_world_size() > 1:
        args.quiet = True  # torchrun: ranks run in step; progress bars and logs would repeat
    _setup_logging(args)
    _no_kill_on_file_size_limit()
    try:
        with init_from_env(getattr(args, "device", None) or "cpu") as world, _rank_stdout(world.rank):
            args.func(args)
    except DepthPruneError as exc:
        message = " ".join(str(exc).split())
        print(f"depthprune: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("depthprune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away: stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
