"""Showing results: tables for people, JSON or YAML for scripts, and errors without tracebacks."""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
import yaml
from rich.markup import escape
from rich.table import Table

from khutulun.cli.context import CliState
from khutulun.errors import KhutulunError, Problem, TemplateError

__all__ = ["ago", "emit", "show_error", "table"]


def emit(state: CliState, data: Any, people: Callable[[], None]) -> None:
    """``data`` as JSON or YAML when a script asked for it, else what ``people`` prints."""
    if state.output == "json":
        click.echo(json.dumps(data, indent=2, default=str))
    elif state.output == "yaml":
        click.echo(yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip())
    else:
        people()


def table(state: CliState, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str | None = None) -> None:
    grid = Table(title=title, box=None, header_style="bold", pad_edge=False, show_edge=False)
    for i, column in enumerate(columns):
        last = i == len(columns) - 1
        grid.add_column(column, no_wrap=not last, overflow="fold" if last else "ignore")
    for row in rows:
        grid.add_row(*("" if v is None else escape(str(v)) for v in row))
    state.out.print(grid)


def ago(when: float | None) -> str:
    if not when:
        return ""
    seconds = max(0, int(time.time() - when))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    if seconds < 172800:
        return f"{seconds // 3600}h ago"
    return datetime.datetime.fromtimestamp(when).strftime("%Y-%m-%d")


def _source_line(problem: Problem) -> list[str]:
    """The offending line with a caret under the column, when the file can be read here."""
    if not problem.line:
        return []
    try:
        lines = Path(problem.file).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    if problem.line > len(lines):
        return []
    text = lines[problem.line - 1]
    gutter = f"{problem.line:>5} | "
    return [gutter + text, " " * (len(gutter) - 2) + "| " + " " * max(0, problem.column - 1) + "^"]


def _relative(path: str) -> str:
    try:
        cwd = str(Path.cwd())
    except OSError:
        return path
    return path[len(cwd) + 1:] if path.startswith(cwd + "/") else path


def show_error(state: CliState, error: KhutulunError) -> None:
    if state.machine:
        state.err.print(json.dumps({"error": error.to_wire()}), markup=False)
        return
    if isinstance(error, TemplateError):
        for problem in error.problems:
            where = _relative(problem.file)
            if problem.line:
                where += f":{problem.line}:{problem.column}"
            state.err.print(f"[bold]{escape(where)}:[/bold] [red]error:[/red] {escape(problem.message)}")
            for line in _source_line(problem):
                state.err.print(escape(line), style="dim")
            if problem.path:
                state.err.print(f"        at {escape(problem.path)}", style="dim")
        count = len(error.problems)
        state.err.print(f"[red]{count} problem{'s' if count != 1 else ''}[/red]; nothing was changed")
        return
    state.err.print(f"[red]error:[/red] {escape(error.message)}")
