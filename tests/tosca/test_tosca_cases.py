"""Broken templates, one per file under cases/broken, each naming the problems it must produce."""

from __future__ import annotations

import pytest

from khutulun.errors import TemplateError
from khutulun.tosca import load_file
from tests.cases import Case, broken_cases

CASES = broken_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.path.stem for c in CASES])
def test_broken_template_reports_located_problems(case: Case) -> None:
    assert case.expected, f"{case.path.name} names no expected problem"
    with pytest.raises(TemplateError) as caught:
        load_file(case.path, case.inputs)
    problems = caught.value.problems
    seen = [(p.line, p.column, p.message) for p in problems]
    for line, column, prefix in case.expected:
        assert any(p.line == line and p.column == column and p.message.startswith(prefix) for p in problems), (
            f"expected {line}:{column} {prefix!r}; got {seen}")
    for problem in problems:
        assert problem.file.endswith(case.path.name), problem
        assert "Traceback" not in problem.message
