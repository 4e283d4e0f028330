"""StepCache, and run_step behind its caching store and log: fewer round trips, the same
records."""

from __future__ import annotations

from typing import Any

from modules.core.jobspec import parse_job_spec
from modules.core.records import StepRecord
from modules.pipeline.local import LocalWorkspace
from modules.pipeline.run import run_step
from modules.pipeline.step_cache import CachingStepLog, CachingStore, StepCache


def rec(index: int, **extra: Any) -> StepRecord:
    return StepRecord(job_id="j", index=index, step="s", **extra)


def test_known_records_need_the_whole_prefix() -> None:
    cache = StepCache()
    assert cache.known_records("j", 1) is None
    cache.remember("j", [rec(0), rec(2)])
    assert cache.known_records("j", 0) is None  # step 0 always asks the log
    assert cache.known_records("j", 1) == {0: rec(0), 2: rec(2)}
    assert cache.known_records("j", 3) is None  # record 1 missing
    cache.remember("j", [rec(1)])
    assert set(cache.known_records("j", 3) or {}) == {0, 1, 2}


def test_jobs_are_forgotten_least_recently_used_first() -> None:
    cache = StepCache(max_jobs=2)
    cache.remember("a", [rec(0)])
    cache.remember("b", [rec(0)])
    assert cache.known_records("a", 1) is not None  # a is now the most recent
    cache.remember("c", [rec(0)])
    assert cache.known_records("b", 1) is None
    assert cache.known_records("a", 1) is not None and cache.known_records("c", 1) is not None


def test_blobs_keep_to_their_budget_and_their_size() -> None:
    cache = StepCache(max_bytes=10, max_blob_bytes=6)
    cache.keep_blob("k1", b"12345")
    cache.keep_blob("k2", b"abcd")
    assert cache.blob_bytes == 9
    assert cache.blob("k1", size=5) == b"12345"
    assert cache.blob("k1", size=4) is None  # the recorded size disagrees: download instead
    cache.keep_blob("k3", b"xyz")  # evicts k2, the least recently used
    assert cache.blob("k2", size=None) is None
    assert cache.blob_bytes == 8
    cache.keep_blob("big", b"1234567")  # over the per-blob cap: not kept
    assert cache.blob("big", size=None) is None
    cache.keep_blob("k1", b"9")  # replacing a key frees its old bytes
    assert cache.blob_bytes == 4
    cache.drop_blob("k1")
    assert cache.blob("k1", size=None) is None and cache.blob_bytes == 3


class CountingLog:
    def __init__(self, inner: Any) -> None:
        self.inner, self.queries, self.appends = inner, 0, 0

    def records(self, job_id: str) -> list[StepRecord]:
        self.queries += 1
        return list(self.inner.records(job_id))

    def get(self, job_id: str, index: int) -> StepRecord | None:
        return self.inner.get(job_id, index)

    def append(self, record: StepRecord) -> bool:
        self.appends += 1
        return bool(self.inner.append(record))


class CountingStore:
    def __init__(self, inner: Any) -> None:
        self.inner, self.downloads = inner, 0

    def get_bytes(self, key: str) -> bytes:
        self.downloads += 1
        return bytes(self.inner.get_bytes(key))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def cached_run(job: Any, index: int, *, store: Any, log: Any, cache: StepCache) -> Any:
    """run_step as the engine runs it for a worker with a cache."""
    return run_step(
        job,
        index,
        store=CachingStore(store, cache),
        log=CachingStepLog(log, cache, upto=index),
    )


def spec() -> Any:
    return parse_job_spec(
        {
            "job_id": "cj",
            "steps": [
                {"name": "train", "params": {"model": "logreg"}},
                {"name": "measure", "params": {"runs": 3, "batch_sizes": [1]}},
                {"name": "measure", "params": {"runs": 3, "batch_sizes": [1]}},
            ],
        }
    )


def test_run_step_with_a_cache_skips_the_query_and_the_download(tmp_path) -> None:
    ws = LocalWorkspace(tmp_path / "cached")
    log, store, cache = CountingLog(ws.log), CountingStore(ws.store), StepCache()
    job = spec()
    records = [cached_run(job, i, store=store, log=log, cache=cache) for i in range(3)]
    # Step 0 asks the log; steps 1 and 2 know records 0..i-1 and the model this process wrote.
    assert (log.queries, store.downloads, log.appends) == (1, 0, 3)
    assert [r.index for r in ws.log.records("cj")] == [0, 1, 2]
    assert records[1].input_size == records[0].output_size
    # Running a step again returns its stored record without running it.
    assert cached_run(job, 2, store=store, log=log, cache=cache) == records[2]
    assert log.appends == 3

    # Without a cache: one query and one download per step after the first.
    plain = LocalWorkspace(tmp_path / "plain")
    plain_log, plain_store = CountingLog(plain.log), CountingStore(plain.store)
    for i in range(3):
        run_step(job, i, store=plain_store, log=plain_log)  # type: ignore[arg-type]
    assert (plain_log.queries, plain_store.downloads) == (3, 2)


def test_a_blob_of_the_wrong_size_is_downloaded_again(tmp_path) -> None:
    ws = LocalWorkspace(tmp_path)
    store, cache = CountingStore(ws.store), StepCache()
    job = spec()
    first = cached_run(job, 0, store=store, log=ws.log, cache=cache)
    cache.keep_blob(first.output_key, b"not the model")
    record = cached_run(job, 1, store=store, log=ws.log, cache=cache)
    assert store.downloads == 1
    assert record.input_size == first.output_size


def test_a_record_stored_by_another_process_wins(tmp_path) -> None:
    ws = LocalWorkspace(tmp_path)
    cache = StepCache()
    job = spec()
    cached_run(job, 0, store=ws.store, log=ws.log, cache=cache)
    # Another worker ran step 1 meanwhile; this process's cache does not know it.
    theirs = run_step(job, 1, store=ws.store, log=ws.log)
    ours = cached_run(job, 1, store=ws.store, log=ws.log, cache=cache)
    assert ours == theirs
    assert [r.index for r in ws.log.records("cj")] == [0, 1]
    assert cache.known_records("cj", 2) is not None
