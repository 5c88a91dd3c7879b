"""Restore: resolve a point's block map across its chain, read the chunks pack by pack in physical
order, verify each against its id, decompress in parallel and write them at their block offsets.

Steps:
1. Resolve the disk's map at the point (and, for `--onto`, at the base point) one window of
   2^20 blocks at a time, the chain's maps streamed in lockstep (repository/blockmap.py): the
   map is never held whole, and a window no map stores (all ZERO) costs nothing.
2. Choose the window's blocks to write: every non-ZERO block into a fresh sparse file (holes stay
   holes), every block on a block device, only blocks whose ref differs from the base's for
   `--onto`.
3. Group those blocks by ref (a chunk is read and checked once however many blocks of a slice
   hold it).
4. Sort the refs by (pack, offset) and cut them into requests within one pack: chunks separated
   by a small gap share a request (reading the gap costs less than another request on object
   storage: each costs a round trip and CPU on both sides), up to 64 MiB; each request is cut
   into runs of a few MiB, what a worker holds at once (`plan.ReadSettings`).
5. Workers, several at once (one request in flight each), read a request front to back
   (`Store.open_range`: one HTTP range GET on S3, read as it arrives; a directory store preads
   a cached descriptor), a run at a time, each into the request's one buffer: decompress and
   re-hash each chunk of the run (zstd and BLAKE3 release the GIL: the workers use every core)
   and hand the checked chunks, in batches, to the one writer thread, which writes each batch at its blocks with one call
   (`Disk.write_chunks`). Decoding overlaps the rest of the request arriving, the other
   workers' reads and the writes; a request is issued only when the bytes of runs read and not
   yet checked (counting its largest run) stay under a cap, and a batch is handed over only
   when the bytes handed over and not yet written stay under another, so memory does not grow
   with the disk. A batch's chunks are decompressed into one aligned buffer, a block apart,
   and the target is written past the page cache where the kernel allows it (`O_DIRECT`): each
   run of consecutive blocks with one request straight from that buffer, several writer
   threads keeping several requests in flight. That spares a copy of every byte into the page
   cache and the writing back and dropping of its dirty pages (about a fifth of a restore's
   CPU time). Through the page cache instead, one writer thread writes, and every 32 MiB
   written it has the kernel start writing the target's dirty pages back (without waiting).
   Either way the disk writes all along and the final flush is short.
6. Zero blocks that must be written become holes (files) or zeroed ranges (devices); flush.
7. A missing, truncated or damaged pack does not stop the restore (a request that meets it
   goes on a run per request, to tell exactly which chunks it costs): the chunks it cannot give
   are collected, and the restore fails at the end naming the point, the disk and the disk's byte
   ranges hit (exit 3).

Steps 3-6 take the blocks a slice of a window at a time (`ReadSettings.plan_blocks`), so that
neither the plan nor the data in flight grows with the disk.
"""
