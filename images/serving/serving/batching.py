"""Adaptive batching: the rows of concurrent infer requests stacked into one `predict` call.

A scikit-learn call costs mostly per call, not per row (the shipped pipeline: about 250 µs for 1 row or
for 100), so a replica that calls the model once per request spends most of its CPU, under concurrency,
calling it again for work one call could do. The open batch is predicted

- once no other infer request is on its way in (received, its body not yet queued): at the end of the
  event loop's current turn, so the requests the loop took in together join it (under load, those that
  arrived while the previous batch was predicted). A lone client is answered after that one turn, as
  without batching: waiting for requests nobody has sent yet would only make it slower;
- else at its deadline, `max_wait_s` after its first request joined, whether or not the requests it
  waits for came: no request waits longer than that for company;
- at once when it holds `max_rows` rows; a request that would take it past them, or whose rows are of
  another dtype (FP32 stays FP32, as when predicted alone), closes it and opens the next.

Each request gets back exactly its own rows' predictions. When the stacked call fails, every request of
the batch is predicted again on its own, so only the request whose rows make the model fail gets its error.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Union

import numpy as np

Outcome = Union[np.ndarray, Exception]
"""A request's predictions, or what the model raised on its rows."""


@dataclass(frozen=True)
class BatchingSettings:
    max_rows: int
    max_wait_s: float

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "BatchingSettings":
        """The stage's `serving.batching` (MAX_BATCH_SIZE rows, MAX_BATCH_TIME_MS); unset: one call per request."""
        if not env.get("MAX_BATCH_SIZE"):
            return UNBATCHED
        return cls(max_rows=int(env["MAX_BATCH_SIZE"]), max_wait_s=float(env["MAX_BATCH_TIME_MS"]) / 1000)

    @property
    def batches(self) -> bool:
        return self.max_rows > 1


UNBATCHED = BatchingSettings(max_rows=1, max_wait_s=0.0)


class Batcher:
    """Stacks concurrent `predict` calls into calls of `model_predict`; each call's row count goes to
    `observe_rows` (the batch size metric)."""

    def __init__(self, model_predict: Callable[[np.ndarray], Any], settings: BatchingSettings,
                 observe_rows: Callable[[int], None]) -> None:
        self.model_predict = model_predict
        self.settings = settings
        self.observe_rows = observe_rows
        self.pending: list[tuple[np.ndarray, asyncio.Future[Outcome]]] = []
        self.pending_rows = 0
        self.opened_at = 0.0
        self.arriving = 0
        self.end_of_turn: asyncio.Handle | None = None
        self.deadline: asyncio.TimerHandle | None = None

    @contextlib.contextmanager
    def arriving_request(self) -> Iterator[None]:
        """Around receiving an infer request's body: the open batch waits for it, until its deadline."""
        self.arriving += 1
        try:
            yield
        finally:
            self.arriving -= 1
            self._schedule_flush()

    async def predict(self, features: np.ndarray) -> Outcome:
        """`features`' predictions, from a call of the model shared with the other requests of its batch."""
        if self.pending and (self.pending_rows + len(features) > self.settings.max_rows
                             or features.dtype != self.pending[0][0].dtype):
            self._flush()
        loop = asyncio.get_running_loop()
        if not self.pending:
            self.opened_at = loop.time()
        answer: asyncio.Future[Outcome] = loop.create_future()
        self.pending.append((features, answer))
        self.pending_rows += len(features)
        if self.pending_rows >= self.settings.max_rows:
            self._flush()
        else:
            self._schedule_flush()
        return await answer

    def predict_now(self, batches: list[np.ndarray]) -> list[Outcome]:
        """Each of `batches`' predictions, from one call of the model for all of them when that call succeeds,
        else from one call each."""
        if len(batches) == 1:
            return [self._outcome(batches[0])]
        sizes = [len(batch) for batch in batches]
        stacked = self._outcome(np.concatenate(batches))
        if isinstance(stacked, np.ndarray) and len(stacked) == sum(sizes):
            return list(np.split(stacked, np.cumsum(sizes[:-1])))
        return [self._outcome(batch) for batch in batches]

    def _outcome(self, features: np.ndarray) -> Outcome:
        self.observe_rows(len(features))
        try:
            return np.asarray(self.model_predict(features))
        except Exception as error:  # the model's own failure: answered to the request whose rows these are
            return error

    def _schedule_flush(self) -> None:
        if self.pending and self.end_of_turn is None:
            self.end_of_turn = asyncio.get_running_loop().call_soon(self._flush_unless_awaiting)

    def _flush_unless_awaiting(self) -> None:
        """Run once the requests this turn of the loop took in have joined: flush, unless more are on their
        way in; for those, the batch waits until its deadline at most."""
        self.end_of_turn = None
        if not self.arriving:
            self._flush()
        elif self.deadline is None:
            self.deadline = asyncio.get_running_loop().call_at(self.opened_at + self.settings.max_wait_s, self._flush)

    def _flush(self) -> None:
        for timer in (self.end_of_turn, self.deadline):
            if timer is not None:
                timer.cancel()
        self.end_of_turn = self.deadline = None
        batch, self.pending, self.pending_rows = self.pending, [], 0
        for (_, answer), outcome in zip(batch, self.predict_now([features for features, _ in batch])):
            if not answer.cancelled():
                answer.set_result(outcome)
