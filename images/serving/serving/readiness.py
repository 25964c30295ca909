"""Readiness means able to answer: both runtimes report ready only after a test prediction (one row of
zeros) on the loaded model succeeded, and stop after FAILURES_BEFORE_UNREADY infer requests in a row
failed because of the model, until a test prediction succeeds again.

When a prediction fails, the test prediction tells whose fault it was. If it still succeeds, the request's
values made the model raise: every replica would fail them the same way, so the request is answered 422,
which the gateway neither retries nor counts against the replica, and readiness is untouched. Were it a
500, one such request would be tried on up to three replicas and take all but the last out of the
gateway's rotation for 5 s. If the test prediction fails too, the model is at fault: 500, which the gateway
retries on another replica.

Why 3: one failure can be a passing fault, and the gateway already retried that request elsewhere; three
in a row, with the gateway routing around a failing replica for 5 s after each failure
(`max_fails=1 fail_timeout=5s`), means the replica kept failing for about ten seconds. The Docker health
check (every 5 s, 3 retries) then marks it unhealthy. Each readiness probe runs the test prediction again,
so the replica is ready again as soon as its model predicts.
"""
from __future__ import annotations

import logging
from typing import Awaitable, Callable

log = logging.getLogger("serving.readiness")

FAILURES_BEFORE_UNREADY = 3


class Readiness:
    def __init__(self, test_prediction: Callable[[], Awaitable[None]]) -> None:
        self.test_prediction = test_prediction
        """Raises unless the model answered a prediction."""
        self.tested = False
        self.consecutive_failures = 0

    def record_success(self) -> None:
        self.consecutive_failures = 0

    async def model_at_fault(self) -> bool:
        """After a prediction failed: whether the model fails a test prediction too (counted against readiness)
        rather than only the request's values."""
        try:
            await self.test_prediction()
        except Exception:  # whatever the model raises, it cannot answer
            self.consecutive_failures += 1
            if self.consecutive_failures == FAILURES_BEFORE_UNREADY:
                log.error("%d infer requests in a row failed on the model: not ready until a test prediction "
                          "succeeds", FAILURES_BEFORE_UNREADY)
                self.tested = False
            return True
        return False

    async def ready(self) -> bool:
        if not self.tested:
            try:
                await self.test_prediction()
            except Exception as error:  # whatever the model raises is the reason it is not ready
                log.error("not ready: the test prediction failed: %s: %s", type(error).__name__, error)
                return False
            log.info("ready: the test prediction succeeded")
            self.tested = True
            self.consecutive_failures = 0
        return True
