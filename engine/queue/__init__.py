"""The durable queue: messages, their bodies, the due index, the suppression list and the
campaign counters in one LMDB environment.

Modules import only downwards, in this order: ids, records < layout (due keys) <
writetxn (what an op may write) < committer (Op, QueueCommitter) < store_views (reads),
suppression, campaigns (their tables' reads and writes) < store (the environment, the
only lmdb importer) < commit, inline_commit (the two
committers). Code outside the queue names `committer.QueueCommitter`, not either class.
"""
