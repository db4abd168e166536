"""Deadlines kept by one sweep (service/deadlines.py), in-process on a real event loop."""

from __future__ import annotations

import asyncio

from service.deadlines import Sweeper, TaskDeadlines


def test_only_keys_past_their_deadline_expire_and_the_timer_stops_when_none_wait():
    async def scenario() -> tuple[list, int, int]:
        loop = asyncio.get_running_loop()
        expired: list[tuple[str, float]] = []
        started = loop.time()
        sweeper = Sweeper(0.02, lambda key: expired.append((key, loop.time() - started)))
        sweeper.arm("slow", loop, 0.1)
        sweeper.arm("answered", loop, 0.1)
        sweeper.arm("later", loop, 60)
        sweeper.disarm("answered")
        await asyncio.sleep(0.5)
        sweeper.disarm("later")
        waiting = len(sweeper)
        await asyncio.sleep(0.1)  # five ticks: the sweep finds nothing armed and stops
        return expired, waiting, len([handle for handle in loop._scheduled if not handle.cancelled()])

    expired, waiting, timers_left = asyncio.run(scenario())
    assert [key for key, _ in expired] == ["slow"] and expired[0][1] >= 0.1  # never early
    assert waiting == 0 and timers_left == 0


def test_a_task_past_its_deadline_is_cancelled_and_may_still_answer():
    deadlines = TaskDeadlines(0.1)

    async def slow() -> str:
        task = asyncio.current_task()
        deadlines.arm(task)
        try:
            await asyncio.sleep(5)
            return "finished"
        except asyncio.CancelledError:
            if not deadlines.expired(task):
                raise
            await asyncio.sleep(0)  # no longer cancelled: it can go on to answer
            return "late"
        finally:
            deadlines.disarm(task)

    assert asyncio.run(slow()) == "late"
    assert len(deadlines) == 0


def test_another_cancellation_is_not_taken_for_the_deadline():
    deadlines = TaskDeadlines(10)

    async def cancelled_by_someone_else() -> bool:
        async def waiting() -> None:
            task = asyncio.current_task()
            deadlines.arm(task)
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                assert not deadlines.expired(task)
                raise
            finally:
                deadlines.disarm(task)

        task = asyncio.create_task(waiting())
        await asyncio.sleep(0.01)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return True
        return False

    assert asyncio.run(cancelled_by_someone_else())


def test_two_deadlines_passing_at_once_leave_the_task_answering_and_not_cancelled():
    """The fast lane reads a body under the body deadline inside the response deadline: when both pass
    together, the inner one answers (408) and the outer one's cancellation is taken back too."""
    response, body = TaskDeadlines(0.1), TaskDeadlines(0.1)

    async def read_body() -> str:
        task = asyncio.current_task()
        body.arm(task)
        try:
            await asyncio.sleep(5)
            return "body"
        except asyncio.CancelledError:
            if not body.expired(task):
                raise
            return "408"
        finally:
            body.disarm(task)

    async def request() -> tuple[str, int]:
        task = asyncio.current_task()
        response.arm(task)
        try:
            answer = await read_body()
        finally:
            response.disarm(task)
        await asyncio.sleep(0.01)  # a cancellation left pending would raise here
        return answer, task.cancelling()

    assert asyncio.run(request()) == ("408", 0)
