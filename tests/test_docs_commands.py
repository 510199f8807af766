"""Every shell command in README.md and docs/ runs as pasted: its program exists (an installed console script of
this project, a make target, a script in the repository, or a known tool) and every flag it passes is one its parser
accepts. Nothing is run: the commands are read from the fenced shell blocks and checked against the parsers."""
import argparse
import os
import re
import shlex
import sysconfig
from pathlib import Path

import pytest

from helpers import ROOT

DOCS = [Path(ROOT, "README.md"), *sorted(Path(ROOT, "docs").glob("*.md"))]
SHELL_FENCES = {"bash", "sh", "shell", "console"}
TOOLS = {".", "pip", "git", "cd", "mkdir", "cp", "ls", "cat", "export", "source", "tensorboard", "nvidia-smi", "ssh",
         "horovodrun", "mpirun", "time", "env", "rm", "tar", "curl", "wget", "du", "python3.11"}


def _parsers() -> dict:
    from im2rec_tools.__main__ import build_parser as im2rec
    from xception_mx import config, convert, deploy_cli, launch, score_cli, summary

    return {"train-xception": config.build_parser, "train_xception.py": config.build_parser,
            "xception-score": score_cli.build_parser, "score.py": score_cli.build_parser,
            "xception-deploy": deploy_cli.build_parser, "xception-summary": summary._parser,
            "xception-convert": convert._parser, "im2rec-tools": im2rec,
            "xception_mx.launch": launch.build_parser, "xception_mx.deploy": deploy_cli.build_parser,
            "xception_mx.summary": summary._parser, "xception_mx.convert": convert._parser, "im2rec_tools": im2rec}


#: Sub-command run when none is named (``score.py --model-prefix ...`` scores).
DEFAULT_COMMAND = {"xception-score": "score", "score.py": "score"}


def shell_commands(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, argv) of every command in the file's fenced shell blocks (continuations joined, comments
    and leading VAR=value assignments dropped)."""
    found, fence, pending, start, heredoc = [], None, "", 0, None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
            continue
        if fence not in SHELL_FENCES:
            continue
        if heredoc is not None:  # the body of a here-document is data, not commands
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        marker = re.search(r"<<-?\s*'?\"?(\w+)", line)
        if marker:
            heredoc = marker.group(1)
        if not pending:
            start = number
        pending += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
        if line.rstrip().endswith("\\"):
            continue
        for part in re.split(r"\s(?:&&|\|\||;)\s", pending):
            argv = shlex.split(part, comments=True)
            while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
                argv = argv[1:]
            if argv:
                found.append((start, argv))
        pending = ""
    return found


def _options(parser: argparse.ArgumentParser, argv: list[str], default: str | None) -> set[str]:
    """The option strings accepted for ``argv`` (the sub-command's, when one is named or is the default)."""
    options = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            named = next((a for a in argv if not a.startswith("-")), None)
            sub = action.choices.get(named) or action.choices.get(default)
            if sub is not None:
                options |= set(sub._option_string_actions)
    return options


def _problem(argv: list[str]) -> str | None:
    """Why this command would not run as pasted, or None."""
    program, args = argv[0], argv[1:]
    if program in ("train_xception.py", "score.py"):  # they work, but not on PATH: docs use the console scripts
        return f"{program}: write the installed console script (train-xception, xception-score)"
    if program in ("python", "python3", ".venv/bin/python") and args[:1] == ["-m"]:
        program, args = args[1], args[2:]
        if program in ("pip", "pytest", "venv"):
            return None
    elif program in ("python", "python3", ".venv/bin/python", "bash"):
        return None if args and os.path.isfile(os.path.join(ROOT, args[0])) else f"no script {args[:1]}"
    if program == "make":
        targets = re.findall(r"^([a-z-]+):", Path(ROOT, "Makefile").read_text(), re.M)
        return None if all(a in targets for a in args if not a.startswith("-") and "=" not in a) else \
            f"make target {args} not in the Makefile"
    parsers = _parsers()
    if program not in parsers:
        scripts = sysconfig.get_path("scripts")
        return None if program in TOOLS else f"{program}: not a program of this project or a known tool ({scripts})"
    head = args[:args.index("--")] if "--" in args else args
    options = _options(parsers[program](), head, DEFAULT_COMMAND.get(program))
    unknown = [a.split("=")[0] for a in head if a.startswith("--") and a.split("=")[0] not in options]
    if "--" in args and program == "xception_mx.launch":
        return _problem(args[args.index("--") + 1:])
    return f"{program}: unknown flags {unknown}" if unknown else None


COMMANDS = [(f"{p.name}:{n}", argv) for p in DOCS for n, argv in shell_commands(p)]


def test_the_docs_hold_commands_to_check():
    assert len(COMMANDS) > 30


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_each_documented_command_names_a_real_program_and_real_flags(where, argv):
    assert _problem(argv) is None, f"{where}: {' '.join(argv)}: {_problem(argv)}"


def test_the_project_scripts_are_installed_and_the_top_level_ones_executable():
    scripts = Path(sysconfig.get_path("scripts"))
    for name in ("train-xception", "xception-score", "xception-deploy", "xception-summary", "xception-convert",
                 "im2rec-tools"):
        assert (scripts / name).is_file(), name
    for name in ("train_xception.py", "score.py"):
        path = Path(ROOT, name)
        assert os.access(path, os.X_OK) and path.read_text().startswith("#!"), name


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number, code) of every fenced ``python`` block in the file."""
    blocks, code, start = [], None, 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if code is None and line.strip() == "```python":
            code, start = [], number
        elif code is not None and line.startswith("```"):
            blocks.append((start, "\n".join(code)))
            code = None
        elif code is not None:
            code.append(line)
    return blocks


#: Python examples that read files a reader makes first (converted weights): checked by tests/test_convert.py.
NEEDS_FILES = ("weights/",)
PYTHON_EXAMPLES = [(f"{p.name}:{n}", code) for p in DOCS for n, code in python_blocks(p)
                   if not any(marker in code for marker in NEEDS_FILES)]


def test_the_python_examples_that_need_no_files_run_as_pasted():
    import subprocess
    import sys

    assert len(PYTHON_EXAMPLES) >= 2
    for where, code in PYTHON_EXAMPLES:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{where}:\n{code}\n{result.stderr[-2000:]}"
