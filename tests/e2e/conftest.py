from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.e2e.harness import Agent


@pytest.fixture
def agent() -> Iterator[Agent]:
    harness = Agent()
    harness.start()
    try:
        yield harness
    finally:
        harness.cleanup()
        shutil.rmtree(harness.root, ignore_errors=True)
