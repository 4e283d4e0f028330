"""What a long-lived worker process already knows, so the next step of a job it has just run
skips round trips to the step log and the artifact store.

* Step records: immutable once stored (the log's put is conditional), so a record this
  process read or stored stays true. `known_records` answers only when the job's records
  0..index-1 are all here; otherwise run_step queries the log as before. A step whose
  record another process stored meanwhile is still caught: the worker drops a task whose
  step was handed off (workers/execute.py), and run_step's conditional append returns the
  stored record, never a second one.
* Model blobs: the bytes of models this process downloaded or uploaded, by key, within a
  byte budget (least recently used out first). A blob is used only when its length matches
  the size the previous step recorded for it.

One instance per process; a Celery pool child runs one task at a time.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

MAX_JOBS = 256
MAX_BYTES = 256 * 2**20
MAX_BLOB_BYTES = 64 * 2**20


class StepCache:
    """Step records and model blobs this process has already seen."""

    def __init__(
        self,
        *,
        max_jobs: int = MAX_JOBS,
        max_bytes: int = MAX_BYTES,
        max_blob_bytes: int = MAX_BLOB_BYTES,
    ) -> None:
        self.max_jobs = max_jobs
        self.max_bytes = max_bytes
        self.max_blob_bytes = min(max_blob_bytes, max_bytes)
        self._records: OrderedDict[str, dict[int, dict[str, Any]]] = OrderedDict()
        self._blobs: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0

    # --- step records ---------------------------------------------------------------------
    def remember(self, job_id: str, records: list[dict[str, Any]]) -> None:
        """Keep stored records of `job_id` (what the log returned or accepted)."""
        known = self._records.setdefault(job_id, {})
        self._records.move_to_end(job_id)
        for record in records:
            known[int(record["index"])] = record
        while len(self._records) > self.max_jobs:
            self._records.popitem(last=False)

    def known_records(self, job_id: str, index: int) -> dict[int, dict[str, Any]] | None:
        """Every cached record of the job when records 0..index-1 are all cached, else None.

        Step 0 always asks the log: nothing here can vouch that no record exists yet.
        """
        known = self._records.get(job_id)
        if known is None or index == 0 or any(i not in known for i in range(index)):
            return None
        self._records.move_to_end(job_id)
        return dict(known)

    # --- model blobs ----------------------------------------------------------------------
    def keep_blob(self, key: str, blob: bytes) -> None:
        """Keep a model's bytes unless it is larger than one blob may be."""
        self.drop_blob(key)
        if len(blob) > self.max_blob_bytes:
            return
        self._blobs[key] = blob
        self._bytes += len(blob)
        while self._bytes > self.max_bytes:
            _, evicted = self._blobs.popitem(last=False)
            self._bytes -= len(evicted)

    def blob(self, key: str, *, size: int | None) -> bytes | None:
        """The cached bytes of `key` if their length is `size` (any length when None)."""
        blob = self._blobs.get(key)
        if blob is None or (size is not None and len(blob) != size):
            return None
        self._blobs.move_to_end(key)
        return blob

    def drop_blob(self, key: str) -> None:
        blob = self._blobs.pop(key, None)
        if blob is not None:
            self._bytes -= len(blob)

    @property
    def blob_bytes(self) -> int:
        """Bytes of model blobs held now."""
        return self._bytes
