"""Running a plan's steps: each as soon as the steps it needs have succeeded, independent ones in parallel.

A step whose prerequisite failed is skipped (and says which one failed); the steps that do not depend on a
failure still run, so one broken resource leaves the rest of the service as it was planned. All steps run
in one task group owned by :func:`run_steps`, bounded by a semaphore.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from khutulun.errors import KhutulunError
from khutulun.plan import Action, Step

__all__ = ["Outcome", "StepResult", "run_steps"]


class Outcome(enum.StrEnum):
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass
class StepResult:
    step: Step
    outcome: Outcome
    message: str = ""


@dataclass
class _State:
    results: dict[str, StepResult] = field(default_factory=dict)
    finished: dict[str, asyncio.Event] = field(default_factory=dict)


async def run_steps(steps: Sequence[Step], execute: Callable[[Step], Awaitable[str]], *, concurrency: int,
                    on_start: Callable[[Step], None] | None = None,
                    on_result: Callable[[StepResult], None] | None = None) -> list[StepResult]:
    """Run every step that changes something; ``execute`` returns a message or raises KhutulunError (any
    other exception is a bug and is raised out of the group after the running steps ended)."""
    todo = [s for s in steps if s.action is not Action.KEEP]
    keys = {s.key for s in todo}
    state = _State(finished={s.key: asyncio.Event() for s in todo})
    limit = asyncio.Semaphore(max(1, concurrency))

    def finish(result: StepResult) -> None:
        state.results[result.step.key] = result
        state.finished[result.step.key].set()
        if on_result is not None:
            on_result(result)

    async def one(step: Step) -> None:
        for key in step.after:
            if key in keys:
                await state.finished[key].wait()
        failed = [k for k in step.after if k in keys and state.results[k].outcome is not Outcome.DONE]
        if failed:
            finish(StepResult(step, Outcome.SKIPPED, f"skipped: {', '.join(failed)} did not succeed"))
            return
        async with limit:
            if on_start is not None:
                on_start(step)
            try:
                message = await execute(step)
            except KhutulunError as e:
                finish(StepResult(step, Outcome.FAILED, e.message))
                return
            except BaseException:
                finish(StepResult(step, Outcome.FAILED, "internal error"))
                raise
        finish(StepResult(step, Outcome.DONE, message))

    async with asyncio.TaskGroup() as group:
        for step in todo:
            group.create_task(one(step), name=f"step {step.key}")
    return [state.results[s.key] for s in todo]
