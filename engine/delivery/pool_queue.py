"""The jobs waiting in a site pool: a heap by message priority, first in first out
within a priority; and a job split into transactions of at most N recipients.

Priority (`MessageRecord.priority`, 0-9, 9 first): a password reset queued behind
100,000 newsletter messages for the same provider is the next job any session of the
pool takes. The heap key is (-priority, sequence): push and pop cost O(log n), and
the sequence keeps arrival order among equals (a heap alone is not stable).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator

from engine.delivery.job import Job, JobResult


class JobQueue:
    """Loop thread only."""

    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Job]] = []
        self._seq = itertools.count()

    def push(self, job: Job) -> None:
        heapq.heappush(self._heap, (-job.record.priority, next(self._seq), job))

    def pop(self) -> Job:
        """The most urgent job; raises IndexError when empty."""
        return heapq.heappop(self._heap)[2]

    def peek(self) -> Job:
        """The job `pop` would return, left queued; raises IndexError when empty."""
        return self._heap[0][2]

    def __len__(self) -> int:
        return len(self._heap)

    def __bool__(self) -> bool:
        return bool(self._heap)

    def __iter__(self) -> Iterator[Job]:
        """Every queued job, in no particular order."""
        return (entry[2] for entry in self._heap)

    def remove_domain(self, domain: str) -> list[Job]:
        """Take out every job for `domain` (the rest keep their order)."""
        mine = [e for e in self._heap if e[2].domain == domain]
        if mine:
            self._heap = [e for e in self._heap if e[2].domain != domain]
            heapq.heapify(self._heap)
        return [e[2] for e in mine]


def split_job(job: Job, most: int) -> list[Job]:
    """`job` as transactions of at most `most` recipients each (a [[shaping]] entry's
    max_recipients_per_message); `job.done` is called once, with every part's
    replies, when the last part is done. One part: the job itself."""
    if most <= 0 or len(job.indices) <= most:
        return [job]
    chunks = [job.indices[i:i + most] for i in range(0, len(job.indices), most)]
    results: list[JobResult] = []

    def part_done(result: JobResult) -> None:
        results.append(result)
        if len(results) == len(chunks):
            job.done(merge_results(results))

    return [Job(job.record, job.body, chunk, job.domain, job.route, part_done, job.created,
                prefix=job.prefix) for chunk in chunks]


def merge_results(results: list[JobResult]) -> JobResult:
    """One result for the parts of a split job. Where the parts differ: the
    destination failed if any part saw it fail, retry after the latest time asked,
    attempted if any part was (an unsent part's 451 then counts as a deferral)."""
    replies = {}
    for r in results:
        replies.update(r.replies)
    sent = next((r for r in results if r.mx_host), results[0])
    attempted = [r for r in results if r.attempted]
    return JobResult(
        replies, mx_host=sent.mx_host, ip=sent.ip, tls=sent.tls,
        destination_failed=any(r.destination_failed for r in results),
        retry_after=max(r.retry_after for r in results),
        remote_dsn=any(r.remote_dsn for r in results),
        attempt_started=min((r.attempt_started for r in attempted), default=0.0),
        attempted=bool(attempted),
        suppressed=all(r.suppressed for r in results),
    )
