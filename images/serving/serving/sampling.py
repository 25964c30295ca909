"""Request sampling: a share of the rows a replica predicted, with the predictions, kept as the next training data.

Declared per stage (`serving.sampling`, off unless declared); the component sets SAMPLE_FRACTION, SAMPLES_FILE
(one file per replica on the artifact store's samples volume) and SAMPLES_MAX_BYTES. Each sampled row is one JSON
line: `{"time", "model", "version", "features", "prediction"}`, appended with the batch's other sampled rows in
one write. Once the file would grow past the cap, rows are dropped, never written in part, and counted
(`mlops_samples_dropped_rows_total`), so sampling cannot fill the disk; a restarted replica goes on from its
file's size.
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import orjson
from prometheus_client import Counter


class RequestSampler:
    """Appends the sampled rows to `path`; `counters` are for the app's metrics registry."""

    def __init__(self, path: str, fraction: float, max_bytes: int, *, model: str, version: str) -> None:
        self.fraction = fraction
        self.max_bytes = max_bytes
        self.model = model
        self.version = version
        self.random = np.random.default_rng()
        # O_APPEND: each batch's lines land whole at the end, one write each.
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self.size = os.fstat(self.fd).st_size
        self.lock = threading.Lock()
        self.written = Counter("mlops_samples_written_rows", "Infer rows sampled to the samples volume", registry=None)
        self.dropped = Counter("mlops_samples_dropped_rows", "Sampled rows dropped: the samples file reached its cap, "
                                                             "or the volume refused the write", registry=None)
        self.counters = (self.written, self.dropped)

    @classmethod
    def from_env(cls, *, model: str, version: str) -> "RequestSampler | None":
        """The sampler the stage declares, or None: sampling is off unless SAMPLE_FRACTION is set."""
        fraction = os.environ.get("SAMPLE_FRACTION")
        if not fraction:
            return None
        return cls(os.environ["SAMPLES_FILE"], float(fraction), int(os.environ["SAMPLES_MAX_BYTES"]),
                   model=model, version=version)

    def observe(self, rows: np.ndarray, predictions: np.ndarray) -> None:
        """Keep each of the batch's rows with probability `fraction`."""
        chosen = np.flatnonzero(self.random.random(len(rows)) < self.fraction)
        if not len(chosen):
            return
        now = time.time()
        lines = b"".join(orjson.dumps({"time": now, "model": self.model, "version": self.version,
                                       "features": rows[index].tolist(), "prediction": predictions[index].item()})
                         + b"\n" for index in chosen)
        with self.lock:
            if self.size + len(lines) > self.max_bytes:
                self.dropped.inc(len(chosen))
                return
            try:
                os.write(self.fd, lines)
            except OSError:  # a full or broken volume costs the samples, never the request
                self.dropped.inc(len(chosen))
                return
            self.size += len(lines)
        self.written.inc(len(chosen))
