"""The broken-template cases under tests/tosca/cases/broken, shared by the loader and end-to-end tests.

A case file starts with comments: ``# expect: LINE:COLUMN message-prefix`` for every problem that must be
reported (others may be too), and ``# input: name=value`` for input values to give.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

BROKEN = Path(__file__).parent / "tosca" / "cases" / "broken"


@dataclass(frozen=True)
class Case:
    path: Path
    expected: list[tuple[int, int, str]]
    inputs: dict[str, str]

    @property
    def input_flags(self) -> list[str]:
        return [flag for name, value in self.inputs.items() for flag in ("--input", f"{name}={value}")]


def broken_cases() -> list[Case]:
    cases = []
    for path in sorted(BROKEN.glob("*.yaml")):
        expected: list[tuple[int, int, str]] = []
        inputs: dict[str, str] = {}
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            if m := re.match(r"# expect: (\d+):(\d+) (.*)$", line):
                expected.append((int(m.group(1)), int(m.group(2)), m.group(3)))
            elif m := re.match(r"# input: ([^=]+)=(.*)$", line):
                inputs[m.group(1)] = m.group(2)
        cases.append(Case(path, expected, inputs))
    return cases
