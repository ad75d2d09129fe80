"""Templates that other projects wrote: every one is either accepted or explained, never a crash or a hang.

The corpus is the test data of tosca-parser and heat-translator, fetched from PyPI by scripts/test (which
sets KHUTULUN_CORPUS); templates by URL, in NFV profiles, with duplicate keys or missing inputs are among them.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import pytest

from khutulun.errors import TemplateError
from khutulun.tosca import load_file

pytestmark = pytest.mark.corpus

CORPUS = Path(os.environ["KHUTULUN_CORPUS"]) if os.environ.get("KHUTULUN_CORPUS") else None


def corpus_files() -> list[Path]:
    if CORPUS is None:
        return []
    return sorted(p for p in CORPUS.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


@pytest.mark.skipif(CORPUS is None, reason="KHUTULUN_CORPUS is not set: run scripts/test, which fetches it")
def test_every_template_is_accepted_or_explained_with_a_location() -> None:
    files = corpus_files()
    assert len(files) > 250, f"the corpus looks incomplete: {len(files)} files"
    outcomes: Counter[str] = Counter()
    slowest = 0.0
    for path in files:
        started = time.monotonic()
        try:
            load_file(path, timeout=30)
            outcomes["accepted"] += 1
        except TemplateError as e:
            outcomes["explained"] += 1
            for problem in e.problems:
                assert problem.file and problem.line >= 1, (path, problem)
                assert "took longer than" not in problem.message, (path, problem)
                assert "could not read this template" not in problem.message, (path, problem)
                assert "loader" not in problem.message, (path, problem)
        slowest = max(slowest, time.monotonic() - started)
    assert outcomes["accepted"] > 100 and outcomes["explained"] > 100, outcomes
    assert slowest < 30
