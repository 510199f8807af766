"""What every console script shares: the program's name, the one-line argument parser, sub-command dispatch,
``run_cli`` and logging set-up.

Imports no MXNet: ``train_xception.py`` must choose MXNet's engine before MXNet loads.
"""
from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterable, Sequence

from .errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, Interrupted, UserError
from .installed import check_one_mxnet, missing_module_line

__all__ = ["CONSOLE_SCRIPTS", "program_name", "command_line", "sibling_name", "closest", "did_you_mean", "version_line",
           "OneLineParser", "run_command", "run_cli", "setup_logging", "log_to_file"]

#: Each command's script or ``python -m`` form (what the code names it by) -> its installed console script.
CONSOLE_SCRIPTS = {
    "train_xception.py": "train-xception",
    "score.py": "xception-score",
    "python -m xception_mx.deploy": "xception-deploy",
    "python -m xception_mx.summary": "xception-summary",
    "python -m xception_mx.convert": "xception-convert",
    "python -m im2rec_tools": "im2rec-tools",
}


def program_name(prog: str) -> str:
    """The name the user typed for ``prog`` (a form in :data:`CONSOLE_SCRIPTS`, a sub-command may follow): the
    console script when that is what runs (the basename of ``sys.argv[0]``), else ``prog`` itself. The one place
    that names a program: :class:`OneLineParser` and :func:`run_cli` pass every ``prog`` through it."""
    typed = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    for form, script in CONSOLE_SCRIPTS.items():
        if typed == script and (prog == form or prog.startswith(form + " ")):
            return script + prog[len(form):]
    return prog


def command_line(prog: str, *args: object) -> str:
    """A command to paste into a shell: ``prog`` (a form in :data:`CONSOLE_SCRIPTS`, a sub-command may follow) as
    the user would type it, this program or another of ours (:func:`sibling_name`), and ``args``, each quoted
    (``shlex.join``: a folder named ``my run é (v1)`` survives)."""
    form = next((f for f in CONSOLE_SCRIPTS if prog == f or prog.startswith(f + " ")), None)
    name = sibling_name(form) + prog[len(form):] if form else prog
    return " ".join([name, shlex.join(map(str, args))]).rstrip()


def sibling_name(form: str) -> str:
    """Another program of this project (a form in :data:`CONSOLE_SCRIPTS`) as the user would type it: its console
    script when the running program is one (they are installed together), else ``form``."""
    typed = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return CONSOLE_SCRIPTS.get(form, form) if typed in CONSOLE_SCRIPTS.values() else form


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to ``word`` (``difflib``; a misspelt flag, key or name), or None if none is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1)
    return close[0] if close else None


def did_you_mean(words: Iterable[str], candidates: Iterable[str]) -> str:
    """`` (did you mean X, Y?)``: the candidate closest to each of ``words`` (:func:`closest`), or ``""``."""
    candidates = list(candidates)
    found = [c for c in (closest(w, candidates) for w in words) if c is not None]
    return f" (did you mean {', '.join(found)}?)" if found else ""


def version_line(prog: str) -> str:
    """``PROG VERSION (mxnet VERSION)``: the MXNet build from its installed metadata (``installed.mxnet_builds``: a
    GPU build is ``mxnet-cu112``), so MXNet is not loaded (the trainer chooses MXNet's engine before it loads)."""
    from .installed import mxnet_builds

    package = sys.modules[__name__.rpartition(".")[0]]  # xception_mx, loaded before any of its modules
    return f"{prog} {package.__version__} ({', '.join(mxnet_builds()) or 'mxnet not installed'})"


class _Version(argparse.Action):
    """``--version``: :func:`version_line`, exit 0."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line(parser.prog))
        parser.exit()


#: argparse's lines for unknown arguments and for a value outside ``choices`` (a sub-command's name among them).
_UNRECOGNIZED = "unrecognized arguments: "
_INVALID_CHOICE = re.compile(r"invalid choice: '(?P<word>[^']*)' \(choose from (?P<choices>.*)\)$")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one :class:`UserError` line (not usage + error + exit), under the name
    the user typed (:func:`program_name`), with the closest flag or value when one is close (:func:`did_you_mean`);
    ``--version`` (top-level parsers); :meth:`add_commands` makes its sub-commands."""

    top_level = True  # False for sub-command parsers: no --version of their own

    def __init__(self, *args, **kwargs) -> None:
        if kwargs.get("prog") is not None:
            kwargs["prog"] = program_name(kwargs["prog"])
        super().__init__(*args, **kwargs)
        self.commands: argparse._SubParsersAction | None = None
        self.parsed: argparse.Namespace | None = None  # what the last parse_known_args found
        if self.top_level:
            self.add_argument("--version", action=_Version, help="print the version (and MXNet's) and exit")

    def add_commands(self) -> argparse._SubParsersAction:
        """The sub-commands: ``add_parser(name, ...)`` each, with ``set_defaults(func=...)`` (``func(args)`` runs
        it, see :func:`run_command`)."""
        self.commands = self.add_subparsers(dest="command", metavar="COMMAND", parser_class=_CommandParser)
        return self.commands

    def parse_known_args(self, args=None, namespace=None):
        """argparse's; the result is kept, so that :meth:`error` knows the sub-command chosen."""
        parsed, extras = super().parse_known_args(args, namespace)
        self.parsed = parsed
        return parsed, extras

    def flags(self) -> list[str]:
        """The option strings this parser shows in its help."""
        return [s for a in self._actions if a.help is not argparse.SUPPRESS for s in a.option_strings]

    def error(self, message):
        chosen = self.commands.choices.get(getattr(self.parsed, "command", "")) if self.commands else None
        owner = chosen if isinstance(chosen, OneLineParser) and message.startswith(_UNRECOGNIZED) else self
        raise UserError(message + (owner._hint(message) or f" (see {owner.prog} --help)"))

    def _hint(self, message: str) -> str:
        """`` (did you mean ...?)`` for an unknown flag (among this parser's) or a value outside a flag's choices (a
        sub-command's name among them)."""
        if message.startswith(_UNRECOGNIZED):
            unknown = [word.split("=")[0] for word in message[len(_UNRECOGNIZED):].split() if word[:1] == "-"]
            return did_you_mean(unknown, self.flags())
        choice = _INVALID_CHOICE.search(message)
        return did_you_mean([choice["word"]], re.findall(r"'([^']*)'", choice["choices"])) if choice else ""


class _CommandParser(OneLineParser):
    """A sub-command's parser (``im2rec-tools pack``): the top-level parser has ``--version``."""

    top_level = False


def run_command(parser: OneLineParser, argv: Sequence[str], default: str | None = None,
                interrupted_hint: str = "") -> int:
    """Parse ``argv`` with a parser made by :meth:`OneLineParser.add_commands` and run the chosen sub-command's
    ``func(args)`` under :func:`run_cli`: a parse error starts with the program's name, a failure of the command
    with the name and the sub-command as typed. ``default``: the sub-command run when ``argv`` names none."""
    argv = list(argv)
    if parser.commands is None:
        raise TypeError("run_command needs a parser whose add_commands() was called")
    names = parser.commands.choices
    implicit = default is not None and not (argv[:1] and (argv[0] in names or argv[0] in ("-h", "--help", "--version")))
    parsed = []

    def parse() -> None:
        args = parser.parse_args([default, *argv] if implicit and default is not None else argv)
        if args.command is None:
            raise UserError(f"choose a command: {', '.join(names)} (see {parser.prog} --help)")
        parsed.append(args)

    code = run_cli(parser.prog, parse)
    if code:
        return code
    args = parsed[0]
    prog = parser.prog if implicit else f"{parser.prog} {args.command}"
    return run_cli(prog, lambda: args.func(args), interrupted_hint)


def run_cli(prog: str, body: Callable[[], int | None], interrupted_hint: str = "") -> int:
    """Run ``body()``; a known failure becomes ``prog: error: <one line>`` on stderr and its exit code (``prog``
    as the user typed it: :func:`program_name`)."""
    prog = program_name(prog)
    try:
        check_one_mxnet()
        return body() or 0
    except ImportError as exc:  # MXNet missing or broken: the extra to install
        line = missing_module_line(exc)
        if line is None:
            raise
        print(f"{prog}: error: {line}", file=sys.stderr)
        return EXIT_FAILED
    except Interrupted as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_code
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # the reader of stdout stopped (`... | head`): stop quietly, as shell tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes it
        return EXIT_FAILED
    except OSError as exc:  # unwritable output, disk full, a file that vanished
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{prog}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted{'; ' + interrupted_hint if interrupted_hint else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED


def setup_logging(verbose: bool = False) -> None:
    """``HH:MM:SS message`` lines on stdout for the ``xception_mx`` loggers; MXNet's "Subgraph backend MKLDNN is
    activated" line (``MXNET_SUBGRAPH_VERBOSE``, read at each graph build) off unless the user set it."""
    os.environ.setdefault("MXNET_SUBGRAPH_VERBOSE", "0")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    handler.addFilter(lambda record: not getattr(record, "file_only", False))  # lines a progress bar stands for
    root = logging.getLogger("xception_mx")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


class _QuietFileHandler(logging.FileHandler):
    """A log file that, when a write fails (a full disk), stops writing instead of printing a traceback per line:
    the failure itself reaches the user as one line from the code that hit it."""

    def handleError(self, record):
        logging.getLogger("xception_mx").removeHandler(self)


_file_handler: logging.Handler | None = None


def log_to_file(path: str) -> None:
    """Also write the ``xception_mx`` log to ``path`` (replacing an earlier file handler of this process)."""
    global _file_handler
    root = logging.getLogger("xception_mx")
    if _file_handler is not None:
        root.removeHandler(_file_handler)
        _file_handler.close()
    _file_handler = _QuietFileHandler(path)
    _file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.addHandler(_file_handler)
