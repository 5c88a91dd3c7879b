"""Maintenance: statistics, retention and forget, garbage collection, verify, scrub and
rebuild-index; each module's docstring states its protocol.

Maintenance reads and deletes the repository's objects only through the repository and its
store (names, never paths): walks list the store (`inventory.objects_under`), deletions are
batched (`Store.delete`). What stays local: the index, the lock files, the pack spool.

Memory: gc, verify and rebuild-index read the index's per-chunk tables a batch at a time and keep
a few bytes per chunk in numpy arrays (`tally.py`), and read map files one at a time;
rebuild-index sorts the packs' entries through files (`rebuild.py`).

Concurrency rules (docs/FORMAT.md, "Concurrency", has them in full):

- Locks: backup, restore, points, show, diff, stats, verify, scrub and `gc --dry-run` take a
  *shared* lock; forget, protect, gc, the repair step of `verify --repair` and `scrub --repair`
  the *maintenance* lock (one holder at a time, beside any shared ones); rebuild-index the
  *exclusive* lock. A conflict fails at once (exit 1). forget and gc take no outer shared lock:
  gc waits for every lock but its own.
- Lock, then read: the index opens on first use; `Repository.lock` reopens an index that
  rebuild-index replaced before the lock was taken, and decisions read before the lock are
  checked again under it.
- A shared holder may assume that no object the index named while it held the lock is deleted
  before it releases it; the catalog may still change (forget), so a finding about a point whose
  record changed since it was read is not reported as damage.
- A maintenance holder shares the repository with running backups: whatever it writes in a
  write transaction is derived from that transaction's own reads, or limited to what its earlier
  snapshot saw (the recount: unchanged catalog, live counts for packs below the snapshot's
  `next_pack`, `gc_mark` set to it).
- gc deletes an object only after waiting for every session that held a lock when it made the file
  unreachable (gc.py, steps 4 and 7); verify and scrub hold their shared lock from before their
  snapshot to their report, so they never report what gc or forget removed meanwhile as damage.
"""
