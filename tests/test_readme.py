"""The README's ``offramp`` commands, as written, are commands that the CLI takes: no missing
argument, no option that does not exist, no value of the wrong type. Placeholders in capitals
(BUNDLE, RUN/model.pt, A, N) stand for values of the right kind."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from offramp.cli.main import _command, build_parser

README = Path(__file__).resolve().parent.parent / "README.md"
# the rest (BUNDLE, RUN/model.pt, DIR) are paths; [optional parts] are left out
PLACEHOLDERS = {"A": "0.9", "N": "8", "COMMAND": "up"}


def _commands() -> list[str]:
    text = README.read_text()
    found = []
    for block in re.findall(r"```(?:sh|bash)\n(.*?)```", text, re.S):
        for line in block.splitlines():
            if m := re.match(r"^(?:\.venv/bin/)?offramp\s+(.*)$", line.split(" #")[0].strip()):
                found.append(m.group(1))
    # commands in the text, with options: `offramp export RUN/model.pt --out BUNDLE --cuts 2,4`
    found += [re.sub(r"^(?:\.venv/bin/)?offramp\s+", "", c)
              for c in re.findall(r"`((?:\.venv/bin/)?offramp [^`]*--[^`]*)`", text)]
    return found


def _argv(command: str) -> list[str]:
    shell = re.split(r"\s[>|&]\s|\s&$", command)[0]  # a redirection, a pipe, a background job
    return [PLACEHOLDERS.get(w, w) for w in shlex.split(re.sub(r"\[[^]]*\]", "", shell))]


def test_the_readme_shows_commands() -> None:
    commands = _commands()
    assert len(commands) >= 15, commands
    assert any(c.startswith("up") for c in commands) and any("export" in c for c in commands)


@pytest.mark.parametrize("command", _commands())
def test_a_readme_command_is_taken_as_written(command: str) -> None:
    argv = _argv(command)
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(io.StringIO()):
            build_parser(_command(argv)).parse_args(argv)
    except SystemExit as exc:
        assert not exc.code, f"offramp {command}: {said.getvalue().strip()}"
