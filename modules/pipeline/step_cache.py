"""What a long-lived worker process already knows, so the next step of a job it has just run
skips round trips to the step log and the artifact store.

* Step records: immutable once stored (the log's put is conditional), so a record this
  process read or stored stays true. `known_records` answers only when the job's records
  0..index-1 are all here; otherwise the log is queried as before. A step whose
  record another process stored meanwhile is still caught: the engine drops a task whose
  step was handed off (modules/pipeline/engine.py), and the log's conditional append
  returns the stored record, never a second one.
* Model blobs: the bytes of models this process downloaded or uploaded, by key, within a
  byte budget (least recently used out first). A blob is used only when its length matches
  the size a known record gives for that key.

run_step knows nothing of this: the engine hands it a CachingStore and a CachingStepLog
(the ArtifactStore and StepLog protocols) in front of the real ones. One instance per
process; a Celery pool child runs one task at a time.
"""

from __future__ import annotations

from collections import OrderedDict

from modules.core.records import StepRecord
from modules.pipeline.settings import Services
from modules.storage.artifacts import ArtifactStore
from modules.storage.steplog import StepLog

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
        self._records: OrderedDict[str, dict[int, StepRecord]] = OrderedDict()
        self._blobs: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        # The size each known record gives its output model: a cached blob must match it.
        self._sizes: OrderedDict[str, int] = OrderedDict()

    # --- step records ---------------------------------------------------------------------
    def remember(self, job_id: str, records: list[StepRecord]) -> None:
        """Keep stored records of `job_id` (what the log returned or accepted)."""
        known = self._records.setdefault(job_id, {})
        self._records.move_to_end(job_id)
        for record in records:
            known[record.index] = record
            key, size = record.output_key, record.output_size
            if key and size is not None:
                self._sizes[key] = size
                self._sizes.move_to_end(key)
        while len(self._records) > self.max_jobs:
            self._records.popitem(last=False)
        while len(self._sizes) > 64 * self.max_jobs:
            self._sizes.popitem(last=False)

    def recorded_size(self, key: str) -> int | None:
        """The size a known record gives the model at `key`, or None when none names it."""
        return self._sizes.get(key)

    def known_records(self, job_id: str, index: int) -> dict[int, StepRecord] | None:
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


def _is_model_key(key: str) -> bool:
    # Step outputs are {prefix}model{suffix} (run.py), uploads .../model{suffix}: the bytes
    # worth keeping; a step's other files and data inputs go straight through.
    return key.rsplit("/", 1)[-1].startswith("model.")


class CachingStore:
    """An ArtifactStore that serves model bytes this process already holds."""

    def __init__(self, inner: ArtifactStore, cache: StepCache) -> None:
        self.inner = inner
        self.cache = cache

    def get_bytes(self, key: str) -> bytes:
        if not _is_model_key(key):
            return self.inner.get_bytes(key)
        blob = self.cache.blob(key, size=self.cache.recorded_size(key))
        if blob is None:
            blob = self.inner.get_bytes(key)
            self.cache.keep_blob(key, blob)
        return blob

    def put_bytes(self, key: str, data: bytes) -> None:
        self.inner.put_bytes(key, data)
        if _is_model_key(key):
            self.cache.keep_blob(key, data)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def size(self, key: str) -> int:
        return self.inner.size(key)

    def list(self, prefix: str) -> list[str]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.cache.drop_blob(key)
        self.inner.delete(key)

    def url(self, key: str, *, expires_s: int = 3600) -> str:
        return self.inner.url(key, expires_s=expires_s)


class CachingStepLog:
    """A StepLog that answers from the records this process knows, for a step `upto` of a job:
    records() is served when records 0..upto-1 are all known (else the log is asked)."""

    def __init__(self, inner: StepLog, cache: StepCache, *, upto: int) -> None:
        self.inner = inner
        self.cache = cache
        self.upto = upto

    def records(self, job_id: str) -> list[StepRecord]:
        known = self.cache.known_records(job_id, self.upto)
        if known is not None:
            return [known[i] for i in sorted(known)]
        records = self.inner.records(job_id)
        self.cache.remember(job_id, records)
        return records

    def get(self, job_id: str, index: int) -> StepRecord | None:
        found = self.inner.get(job_id, index)
        if found is not None:
            self.cache.remember(job_id, [found])
        return found

    def append(self, record: StepRecord) -> bool:
        written = self.inner.append(record)
        if written:
            self.cache.remember(record.job_id, [record])
        elif record.wrote_model:
            # Another process stored this step first: its record may describe other bytes.
            assert record.output_key is not None  # wrote_model implies an output key
            self.cache.drop_blob(record.output_key)
        return written


def caching_services(services: Services, cache: StepCache, *, upto: int) -> Services:
    """`services` with the store and step log behind `cache`, for running step `upto`."""
    return Services(
        CachingStore(services.store, cache),
        CachingStepLog(services.log, cache, upto=upto),
        services.jobs,
    )
