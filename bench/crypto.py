#!/usr/bin/env python3
"""What sealing costs on this machine: the AEADs next to the hashing and compressing a backup does.

    python3 bench/crypto.py [--data FILE] [--mib 64] [--rounds 3] [--scrypt 14:8:1,16:8:1,...]

Prints, for messages of 64 KiB (one block) and 4 MiB, the single-core throughput (MB/s of CPU
time, so that other processes sharing the cores do not count; wall MB/s beside it) of

  AES-256-GCM, AES-256-GCM-SIV, ChaCha20-Poly1305   seal and open (`cryptography`), a counter nonce
                                                   per message under one key, as packs use them
  BLAKE3 (keyed, as chunk ids are)                  the `blake3` package, one thread
  zstd level 1                                      compress (`zstandard`), the backup's codec

all over the same bytes: `--data FILE` (the first --mib MiB of its non-zero 64 KiB blocks, e.g. of
a workload image: what a backup of it stores), or by default real files of this machine
(/usr/lib, /usr/share, as bench/workload.py fills its disk).
Then a pack written (`PackWriter.add` of every 64 KiB message, then `finish` into a local store)
and its chunks opened again (`PackKeys.open`), unencrypted and sealed: what encryption
adds to a backup's and a restore's pack work, per core. Then HKDF-SHA256 derivations per
second (one per sealed object: derive the object key and build its cipher), and the time and
memory of scrypt for each `--scrypt log2(n):r:p`. Each figure is the best of --rounds rounds.
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3
import zstandard
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESGCMSIV, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

MIB = 1 << 20
SIZES = {"64 KiB": 64 << 10, "4 MiB": 4 << 20}
AEADS = {"AES-256-GCM": AESGCM, "AES-256-GCM-SIV": AESGCMSIV,
         "ChaCha20-Poly1305": ChaCha20Poly1305}
DEFAULT_SCRYPT = "14:8:1,16:8:1,16:8:3,17:8:1,17:12:1,18:8:1"


def machine_files(roots: tuple[str, ...] = ("/usr/lib", "/usr/share")) -> Iterator[Path]:
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in sorted(files):
                path = Path(dirpath, name)
                if path.is_file() and not path.is_symlink():
                    yield path


def nonzero_blocks(path: str, size: int, block: int = 64 << 10) -> bytes:
    """The first `size` bytes of the non-zero blocks of `path`: what a backup stores of it."""
    parts, zero = [], bytes(block)
    with open(path, "rb") as f:
        while len(parts) * block < size and (data := f.read(block)):
            if data != zero[:len(data)]:
                parts.append(data)
    return b"".join(parts)[:size]


def load_data(path: str | None, size: int) -> bytes:
    """`size` bytes of the non-zero blocks of `path`, or of this machine's files end to end."""
    if path:
        return nonzero_blocks(path, size)
    parts, have = [], 0
    for file in machine_files():
        try:
            part = file.read_bytes()[:size - have]
        except OSError:
            continue
        parts.append(part)
        have += len(part)
        if have >= size:
            break
    return b"".join(parts)


def messages(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data) - size + 1, size)]


def best(rounds: int, run: Callable[[], None]) -> tuple[float, float]:
    """The least (CPU seconds, wall seconds) of `rounds` runs."""
    cpu, wall = [], []
    for _ in range(rounds):
        c0, w0 = time.process_time(), time.perf_counter()
        run()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return min(cpu), min(wall)


def nonce(i: int) -> bytes:
    return i.to_bytes(12, "little")


def aead_runs(cls: type, msgs: list[bytes]) -> dict[str, Callable[[], None]]:
    cipher = cls(os.urandom(32))
    sealed = [cipher.encrypt(nonce(i), m, b"chunk" + bytes(32)) for i, m in enumerate(msgs)]

    def seal() -> None:
        for i, m in enumerate(msgs):
            cipher.encrypt(nonce(i), m, b"chunk" + bytes(32))

    def open_() -> None:
        for i, c in enumerate(sealed):
            cipher.decrypt(nonce(i), c, b"chunk" + bytes(32))

    return {"seal": seal, "open": open_}


def reference_runs(msgs: list[bytes]) -> dict[str, Callable[[], None]]:
    key = os.urandom(32)
    compressor = zstandard.ZstdCompressor(level=1)

    def hash_() -> None:
        for m in msgs:
            blake3.blake3(m, key=key).digest()

    def compress() -> None:
        for m in msgs:
            compressor.compress(m)

    return {"BLAKE3 keyed": hash_, "zstd -1 compress": compress}


def throughput_table(data: bytes, rounds: int) -> list[str]:
    rows = ["| operation | " + " | ".join(f"{s} MB/s CPU (wall)" for s in SIZES) + " |",
            "|---|" + "---|" * len(SIZES)]
    results: dict[str, list[str]] = {}
    for size in SIZES.values():
        msgs = messages(data, size)
        nbytes = len(msgs) * size
        runs = {f"{name} {op}": fn for name, cls in AEADS.items()
                for op, fn in aead_runs(cls, msgs).items()}
        runs.update(reference_runs(msgs))
        for name, fn in runs.items():
            cpu, wall = best(rounds, fn)
            results.setdefault(name, []).append(
                f"{nbytes / cpu / 1e6:,.0f} ({nbytes / wall / 1e6:,.0f})")
    rows += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in results.items()]
    return rows


def pack_rows(data: bytes, rounds: int) -> list[str]:
    """Pack write and chunk open, unencrypted (major 1) and sealed (major 2), 64 KiB chunks."""
    import tempfile

    from repo_engine.repository.crypto.null import NULL_SEALER
    from repo_engine.repository.crypto.seal import ObjectSealer
    from repo_engine.repository.packs import PackKeys, PackWriter
    from repo_engine.repository.store.local import LocalStore

    msgs = messages(data, 64 << 10)
    nbytes = len(msgs) * (64 << 10)
    rows = ["| pack, 64 KiB chunks | write MB/s CPU (wall) | open MB/s CPU (wall) |",
            "|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tmp").mkdir()
        store = LocalStore(Path(tmp))
        for label, sealer in (("unencrypted (major 1)", NULL_SEALER),
                              ("sealed (major 2)", ObjectSealer({1: os.urandom(32)}, 1))):
            finished = []

            def write(sealer=sealer) -> None:
                writer = PackWriter(store, sealer)
                for i, m in enumerate(msgs):
                    writer.add(i + 1, i.to_bytes(32, "little"), m, len(m), 0)
                finished.append(writer.finish())

            write_cpu, write_wall = best(rounds, write)
            pack = finished[-1]
            blobs = [(e, store.get_range(f"packs/{pack.name[:2]}/{pack.name}.pack", e.offset,
                                         e.stored)) for e in pack.entries]

            def open_(sealer=sealer) -> None:
                keys = PackKeys(store, sealer)
                for e, blob in blobs:
                    keys.open(pack.name, e.offset, e.chunk_id, blob, "bench")

            open_cpu, open_wall = best(rounds, open_)
            rows.append(f"| {label} | {nbytes / write_cpu / 1e6:,.0f} "
                        f"({nbytes / write_wall / 1e6:,.0f}) | {nbytes / open_cpu / 1e6:,.0f} "
                        f"({nbytes / open_wall / 1e6:,.0f}) |")
        store.close()
    return rows


def hkdf_rate(rounds: int, count: int = 20000) -> float:
    key, salt = os.urandom(32), os.urandom(32)

    def derive() -> None:
        for _ in range(count):
            hkdf = HKDF(hashes.SHA256(), 32, salt, b"repo-engine object v1 chunk")
            AESGCM(hkdf.derive(key))

    cpu, _wall = best(rounds, derive)
    return count / cpu


def scrypt_rows(specs: str, rounds: int) -> list[str]:
    rows = ["| scrypt log2(n) | r | p | memory MiB | CPU s | wall s |", "|---|---|---|---|---|---|"]
    for spec in specs.split(","):
        log_n, r, p = (int(x) for x in spec.split(":"))

        def derive(log_n: int = log_n, r: int = r, p: int = p) -> None:
            Scrypt(os.urandom(32), 32, 1 << log_n, r, p).derive(b"correct horse battery staple")

        cpu, wall = best(rounds, derive)
        memory = 128 * (1 << log_n) * r / MIB
        rows.append(f"| {log_n} | {r} | {p} | {memory:,.0f} | {cpu:.3f} | {wall:.3f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="file whose first --mib MiB are the messages")
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scrypt", default=DEFAULT_SCRYPT, help="log2(n):r:p,...")
    args = parser.parse_args()
    data = load_data(args.data, args.mib * MIB)
    ratio = len(data) / len(zstandard.ZstdCompressor(level=1).compress(data))
    print(f"data: {len(data) / MIB:.0f} MiB from {args.data or '/usr/lib, /usr/share'} "
          f"(zstd -1 ratio {ratio:.2f}); load average {os.getloadavg()[0]:.2f}; "
          f"best of {args.rounds}, one core")
    print("\n".join(throughput_table(data, args.rounds)))
    print()
    print("\n".join(pack_rows(data, args.rounds)))
    print(f"\nHKDF-SHA256 object key + cipher: {hkdf_rate(args.rounds):,.0f} per CPU second\n")
    print("\n".join(scrypt_rows(args.scrypt, args.rounds)))
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
