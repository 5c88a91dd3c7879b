"""The backup pipeline: changed extents -> blocks -> read -> hash -> dedup -> compress -> packs ->
block map -> restore point.

Packs are built in the store's spool directory and published with `Store.put_file`; the write
order of docs/FORMAT.md holds: pack durable -> index -> maps + manifest -> catalog."""
