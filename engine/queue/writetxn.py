"""WriteTxn: what a group-commit op may do inside the batch's write transaction.

store.py creates it and owns the LMDB handles it uses; `StoreTables` names the part of
the store it needs, so this module sits below store.py. lmdb is named here for type
annotations only, so store.py stays the one runtime importer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from engine.queue.ids import ID_LEN
from engine.queue.layout import due_keys, due_value
from engine.queue.records import MessageRecord, decode_record, encode_record

if TYPE_CHECKING:
    import lmdb


class StoreTables(Protocol):
    """What a WriteTxn uses of the store that made it (`store.QueueStore`)."""

    shards: int
    _msg: lmdb._Database
    _body: lmdb._Database
    _due: lmdb._Database
    _ctl: lmdb._Database
    _supp: lmdb._Database
    _camp: lmdb._Database

    def _account_put(self, txn: lmdb.Transaction[bytes], body_len: int, n_keys: int, *,
                     headroom: bool = False) -> None: ...


class WriteTxn:
    """One op's view of the batch's write transaction (an LMDB child transaction).

    Valid only while the op runs; the store invalidates it afterwards.
    """

    __slots__ = ("_store", "_txn")

    def __init__(self, store: StoreTables, txn: lmdb.Transaction[bytes]) -> None:
        self._store = store
        self._txn: lmdb.Transaction[bytes] | None = txn

    @property
    def txn(self) -> lmdb.Transaction[bytes]:
        """The raw lmdb transaction, for store-internal extensions only."""
        if self._txn is None:
            raise RuntimeError("WriteTxn used after its op returned")
        return self._txn

    def get(self, msg_id: bytes) -> MessageRecord | None:
        """The record as seen inside this transaction (including this batch's writes)."""
        data = self.txn.get(msg_id, db=self._store._msg)
        return None if data is None else decode_record(data)

    def get_control(self, name: bytes) -> bytes | None:
        """Control state (`QueueStore.put_control`) as seen inside this transaction: an
        op that must agree with the operator's latest word (a suspension) reads it here."""
        return self.txn.get(name, db=self._store._ctl)

    def put_message(self, record: MessageRecord, body: bytes, *, report: bool = False) -> None:
        """Store a new message: record, body and its due entries.

        `report`: a DSN queued with an outcome. It may use the headroom kept free of new
        mail (`queue.high_water`), so a bounce commits even when the queue is refusing
        mail (P4); only the end of the map itself (MDB_MAP_FULL) stops it.

        Raises:
            ValueError: bad id length, or a domain too long for the due index.
            KeyError: a message with this id is already queued.
            QueueFull: storing it would pass the high-water mark (not a `report`), or
                the map is full.
        """
        s, txn = self._store, self.txn
        if len(record.id) != ID_LEN:
            raise ValueError(f"queue id must be {ID_LEN} bytes")
        keys = due_keys(record, s.shards)  # validates before anything is written
        if not txn.put(record.id, encode_record(record), db=s._msg, overwrite=False):
            raise KeyError(f"message {record.id.hex()} already queued")
        txn.put(record.id, body, db=s._body)
        arrival = due_value(record)
        for k in keys:
            txn.put(k, arrival, db=s._due)
        s._account_put(txn, len(body), len(keys), headroom=report)

    def delete_message(self, msg_id: bytes, stored: MessageRecord | None = None) -> bool:
        """Remove record, body and due entries; False if the message was not queued.

        `stored`: the record as read in this transaction, when the caller has it
        (saves a read and a decode on the delivery hot path)."""
        s, txn = self._store, self.txn
        if stored is not None:
            txn.delete(msg_id, db=s._body)
            for k in due_keys(stored, s.shards):
                txn.delete(k, db=s._due)
            return bool(txn.delete(msg_id, db=s._msg))
        old = txn.get(msg_id, db=s._msg)
        txn.delete(msg_id, db=s._body)
        if old is None:
            return False
        for k in due_keys(decode_record(old), s.shards):
            txn.delete(k, db=s._due)
        txn.delete(msg_id, db=s._msg)
        return True

    def update_message(self, record: MessageRecord, stored: MessageRecord | None = None) -> None:
        """Rewrite a queued record; its due entries become those of its PENDING
        recipients (due at next_attempt). A record with nothing pending has none.
        `stored`: the record as read in this transaction, if the caller has it.

        Raises:
            KeyError: the message is not queued (never resurrect a deleted one).
            ValueError: a domain too long for the due index.
        """
        s, txn = self._store, self.txn
        if stored is None:
            old = txn.get(record.id, db=s._msg)
            if old is None:
                raise KeyError(f"message {record.id.hex()} not queued")
            stored = decode_record(old)
        new_keys = due_keys(record, s.shards)
        for k in due_keys(stored, s.shards):
            txn.delete(k, db=s._due)
        txn.put(record.id, encode_record(record), db=s._msg)
        arrival = due_value(record)
        for k in new_keys:
            txn.put(k, arrival, db=s._due)
