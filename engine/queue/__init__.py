"""The durable queue: messages, their bodies and the due index in one LMDB environment.

Modules import only downwards, in this order: ids, records < layout (due keys) <
writetxn (what an op may write) < committer (Op, QueueCommitter) < store_views (reads)
< store (the environment, the only lmdb importer) < commit, inline_commit (the two
committers). Code outside the queue names `committer.QueueCommitter`, not either class.
"""
