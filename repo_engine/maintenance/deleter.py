"""Deletions of dead objects off a maintenance command's critical path.

A command hands each batch of dead objects to its Deleter (`submit`), whose one thread removes
them (Store.delete) in the order given while the command goes on; the command waits for a
batch only where an order needs it (gc's map files are gone before its sweep commits) and for
every batch before it releases its lock (`with lock, Deleter(store) as deleter:`), so the
next maintenance command never finds a deletion of this one half done. A delete that failed
fails the command then, with the store's error.

Only objects dead once the commit that dropped them is durable are handed over, so a crash
before their deletion leaves orphans, which the next gc removes (docs/FORMAT.md, "Write and
read ordering"): a manifest no catalog record or forget mark names, a map no count names, a
pack file no index table lists.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from ..repository.store import Store


class Deleter:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.given: set[str] = set()  # every object name handed over
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="deleter")
        self._batches: list[Future] = []

    def submit(self, names: list[str]) -> Future:
        """Delete `names` after the batches handed over before; the future is done when they
        are gone (its result raises what the deletion raised)."""
        self.given.update(names)
        self._batches.append(self._pool.submit(self.store.delete, names))
        return self._batches[-1]

    def __enter__(self) -> "Deleter":
        return self

    def __exit__(self, exc_type: object, *_exc: object) -> None:
        """Wait for every batch; raise the first failure unless the command failed already."""
        self._pool.shutdown(wait=True)
        if exc_type is None:
            for batch in self._batches:
                batch.result()
