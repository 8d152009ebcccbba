"""Exception hierarchy.

Errors a peer can see carry the SMTP Reply to send; local faults (storage, config)
are separate types so a caller never mistakes "the client was wrong" for "we broke".
Internal failures answer 451 4.3.0 with bland text: exception messages never reach
the wire.
"""

from __future__ import annotations

from engine.smtp.replies import R451_LOCAL_ERROR, R452_QUEUE_FULL, Reply


class VolleyError(Exception):
    """Base of every error the engine raises on purpose."""


class Transient(VolleyError):
    """Try again later (4xx)."""

    reply: Reply = R451_LOCAL_ERROR


class Permanent(VolleyError):
    """Will never succeed (5xx)."""


class StorageError(Transient):
    """The queue could not take the write (I/O error, EFBIG, readers full, ...)."""

    reply = R451_LOCAL_ERROR


class QueueFull(StorageError):
    """LMDB map full or disk full: refuse new mail, keep what is queued."""

    reply = R452_QUEUE_FULL


class StoragePanic(StorageError):
    """The LMDB environment is unusable (MDB_PANIC); the worker must restart."""
