"""Readiness means able to answer: both runtimes report ready only after a test prediction on the
loaded model succeeded, and stop after FAILURES_BEFORE_UNREADY infer requests in a row failed on the
model's side (500), until a test prediction succeeds again.

Why 3: one failure can be a single poisoned request, and the gateway already retries it on another
replica; three in a row, with the gateway routing around a failing replica for 5 s after each failure
(`max_fails=1 fail_timeout=5s`), means the replica kept failing for about ten seconds. The Docker health
check (every 5 s, 3 retries) then marks it unhealthy. Readiness probes re-run the test prediction, so a
replica whose failures came from its requests, not its model, is ready again at the next probe, and a
client sending requests that make the model raise cannot take replicas out of rotation for long.
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

    def record(self, model_answered: bool) -> None:
        if model_answered:
            self.consecutive_failures = 0
            return
        self.consecutive_failures += 1
        if self.consecutive_failures == FAILURES_BEFORE_UNREADY:
            log.error("%d infer requests in a row failed on the model: not ready until a test prediction succeeds",
                      FAILURES_BEFORE_UNREADY)
            self.tested = False

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
