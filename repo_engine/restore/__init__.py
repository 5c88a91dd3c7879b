"""Restore: resolve a point's block map across its chain, read the chunks pack by pack in physical
order, verify each against its id, decompress in parallel and write them at their block offsets.

Steps:
1. Resolve the disk's map at the point (and, for `--onto`, at the base point) into one ref per block.
2. Choose the blocks to write: every non-ZERO block into a fresh sparse file (holes stay holes),
   every block on a block device, only blocks whose ref differs from the base's for `--onto`.
3. Group those blocks by ref (a chunk is read and checked once however many blocks hold it).
4. Sort the refs by (pack, offset) and cut them into read runs of a few MiB within one pack.
5. Workers read a run with one ranged read of the store (`Store.get_range`; a directory store
   preads a cached descriptor), decompress and re-hash each chunk, and write its blocks.
6. Zero blocks that must be written become holes (files) or zeroed ranges (devices); flush.
"""
