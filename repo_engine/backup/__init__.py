"""The backup pipeline: changed extents -> blocks -> read -> hash -> dedup -> compress -> packs ->
block map -> restore point."""
