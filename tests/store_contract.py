"""The contract every store keeps (repo_engine/repository/store/__init__.py), as a test class.

A store's test module subclasses `StoreContract` and provides a `store` fixture: an empty store
of its kind, closed by the fixture afterwards. Only the interface is used here, so the same tests
hold a directory and a bucket to the same promises.
"""

from __future__ import annotations

import pytest

from repo_engine.errors import DamageError
from repo_engine.repository.store import (ObjectDamaged, ObjectExists, ObjectInfo, ObjectMissing,
                                          ShortRead, StoreError)

MIB_PIECE = 1 << 20  # a piece read into a buffer: more than a socket buffer holds
BAD_NAMES = ["", "/packs/x", "..", "packs/../config", "packs//x", "pa\0cks", "packs\\x"]


def _listed(store, prefix: str) -> dict[str, int]:
    return {info.name: info.size for info in store.list(prefix)}


class StoreContract:
    # -- put and get ------------------------------------------------------------------------
    def test_put_then_get_returns_the_bytes(self, store):
        store.put("config", b"abc")
        store.put("packs/ab/one.pack", memoryview(b"0123456789"))
        assert store.get("config", limit=3) == b"abc"
        assert store.get("packs/ab/one.pack", limit=1 << 20) == b"0123456789"
        assert store.size("packs/ab/one.pack") == 10
        assert store.exists("config") and not store.exists("points/none.point")

    def test_put_replaces_unless_if_absent(self, store):
        store.put("points/p.point", b"old")
        store.put("points/p.point", b"newer")
        assert store.get("points/p.point", limit=100) == b"newer"
        with pytest.raises(ObjectExists):
            store.put("points/p.point", b"third", if_absent=True)
        assert store.get("points/p.point", limit=100) == b"newer"
        store.put("points/q.point", b"first", if_absent=True)
        assert store.get("points/q.point", limit=100) == b"first"

    def test_put_many_puts_each_object_of_a_batch(self, store):
        """Objects in new and existing directories, one replacing an object, one a memoryview:
        each is there whole, and nothing else is listed."""
        store.put("maps/ab/old.map", b"old")
        items = [(f"maps/{i % 3:02x}/{i:04x}.map", bytes([i]) * (i + 1)) for i in range(20)]
        items += [("maps/ab/old.map", b"replaced"), ("points/p.point", memoryview(b"view"))]
        store.put_many(items)
        for name, data in items:
            assert store.get(name, limit=1 << 10) == bytes(data)
        assert {o.name for o in store.list("")} == {name for name, _ in items}
        store.put_many([])

    def test_put_file_publishes_and_consumes_the_spool_file(self, store):
        spool = store.spool_dir() / "pack-1.tmp"
        spool.write_bytes(b"x" * 5000)
        store.put_file("packs/cd/two.pack", spool)
        assert not spool.exists()
        assert store.get("packs/cd/two.pack", limit=5000) == b"x" * 5000
        again = store.spool_dir() / "pack-2.tmp"
        again.write_bytes(b"y")
        with pytest.raises(ObjectExists):
            store.put_file("packs/cd/two.pack", again, if_absent=True)
        assert store.get("packs/cd/two.pack", limit=5000) == b"x" * 5000

    def test_get_refuses_an_object_larger_than_its_limit(self, store):
        store.put("maps/ab/m.map", b"m" * 100)
        assert store.get("maps/ab/m.map", limit=100) == b"m" * 100
        with pytest.raises(StoreError) as caught:
            store.get("maps/ab/m.map", limit=99)
        assert isinstance(caught.value, DamageError) and caught.value.exit_code == 3

    def test_a_missing_object_is_damage_for_a_reader(self, store):
        for read in (lambda: store.get("maps/ab/gone.map", limit=10),
                     lambda: store.get_range("packs/ab/gone.pack", 0, 1),
                     lambda: store.size("packs/ab/gone.pack")):
            with pytest.raises(ObjectMissing) as caught:
                read()
            assert isinstance(caught.value, DamageError) and caught.value.exit_code == 3
            assert "gone" in str(caught.value)

    # -- ranges -----------------------------------------------------------------------------
    def test_get_range_returns_exactly_the_range(self, store):
        data = bytes(range(256)) * 64
        store.put("packs/ef/r.pack", data)
        for offset, length in ((0, 16), (100, 1000), (len(data) - 56, 56), (0, len(data)),
                               (5, 0)):
            assert store.get_range("packs/ef/r.pack", offset, length) == \
                data[offset:offset + length]

    def test_get_start_returns_the_first_bytes_and_the_size(self, store):
        data = bytes(range(256)) * 64
        store.put("maps/ef/h.map", data)
        store.put("maps/ef/e.map", b"")
        for length in (1, 100, len(data) - 1, len(data), len(data) + 1, 10 * len(data)):
            assert store.get_start("maps/ef/h.map", length) == (data[:length], len(data))
        assert store.get_start("maps/ef/e.map", 100) == (b"", 0)
        with pytest.raises(ObjectMissing):
            store.get_start("maps/ef/gone.map", 100)

    def test_get_range_past_the_end_is_a_short_read(self, store):
        store.put("packs/ef/s.pack", b"0123456789")
        for offset, length in ((5, 6), (10, 1), (20, 4)):
            with pytest.raises(ShortRead) as caught:
                store.get_range("packs/ef/s.pack", offset, length)
            assert isinstance(caught.value, DamageError)

    def test_open_range_reads_pieces_and_skips_front_to_back(self, store):
        data = bytes(range(256)) * 8192  # 2 MiB: a skip longer than one piece read to drop
        store.put("packs/ef/o.pack", data)
        with store.open_range("packs/ef/o.pack", 10, len(data) - 20) as reader:
            got = [reader.read(5), reader.read(0)]
            reader.skip(1_500_000)
            got.append(reader.read(100))
            reader.skip(reader.end - reader.position - 7)
            got.append(reader.read(7))
            assert reader.position == reader.end == len(data) - 10
            with pytest.raises(ValueError, match="outside the range read"):
                reader.read(1)
        assert got == [data[10:15], b"", data[1_500_015:1_500_115],
                       data[len(data) - 17:len(data) - 10]]

    def test_open_range_reads_into_a_buffer_reused_piece_after_piece(self, store):
        data = bytes(range(256)) * 12288  # 3 MiB
        store.put("packs/ef/i.pack", data)
        buffer = memoryview(bytearray(MIB_PIECE))
        got = []
        with store.open_range("packs/ef/i.pack", 3, len(data) - 6) as reader:
            for size, skipped in ((MIB_PIECE, 0), (10, 1000), (0, 0), (MIB_PIECE - 1, 5)):
                reader.skip(skipped)
                reader.read_into(buffer[:size])
                got.append(bytes(buffer[:size]))
            assert reader.position == 2 * MIB_PIECE + 1017
            with pytest.raises(ValueError, match="outside the range read"):
                reader.read_into(memoryview(bytearray(reader.end - reader.position + 1)))
        assert got == [data[3:3 + MIB_PIECE], data[MIB_PIECE + 1003:MIB_PIECE + 1013], b"",
                       data[MIB_PIECE + 1018:2 * MIB_PIECE + 1017]]

    def test_read_into_a_buffer_of_a_short_or_missing_object_is_damage(self, store):
        store.put("packs/ef/u.pack", b"0123456789")
        buffer = memoryview(bytearray(8))
        with store.open_range("packs/ef/u.pack", 4, 10) as reader:
            reader.read_into(buffer[:3])
            assert buffer[:3] == b"456"
            with pytest.raises(ShortRead) as caught:
                reader.read_into(buffer[:7])
            assert caught.value.exit_code == 3
        with store.open_range("packs/ab/gone.pack", 0, 4) as reader, \
                pytest.raises(ObjectMissing):
            reader.read_into(buffer[:4])

    def test_open_range_of_a_short_or_missing_object_is_damage(self, store):
        store.put("packs/ef/t.pack", b"0123456789")
        with store.open_range("packs/ef/t.pack", 4, 10) as reader:
            assert reader.read(3) == b"456"
            with pytest.raises(ShortRead) as caught:
                reader.read(7)
            assert isinstance(caught.value, DamageError) and caught.value.exit_code == 3
        for name, offset in (("packs/ef/t.pack", 12), ("packs/ab/gone.pack", 0)):
            with store.open_range(name, offset, 4) as reader, \
                    pytest.raises(ObjectDamaged) as caught:
                reader.read(4)
            assert isinstance(caught.value, ShortRead if "t.pack" in name else ObjectMissing)

    # -- list and delete --------------------------------------------------------------------
    def test_list_yields_every_object_under_a_prefix(self, store):
        names = {"packs/ab/1.pack": 1, "packs/ab/2.pack": 2, "packs/ac/3.pack": 3,
                 "maps/ab/4.map": 4, "mapsx/5": 5, "config": 6}
        for name, size in names.items():
            store.put(name, b"z" * size)
        packs = _listed(store, "packs/")
        assert packs == {n: s for n, s in names.items() if n.startswith("packs/")}
        assert _listed(store, "packs/ab/") == {"packs/ab/1.pack": 1, "packs/ab/2.pack": 2}
        assert _listed(store, "packs/ab") == {"packs/ab/1.pack": 1, "packs/ab/2.pack": 2}
        assert _listed(store, "maps/") == {"maps/ab/4.map": 4}
        assert _listed(store, "points/") == {}
        assert _listed(store, "") == names
        assert all(isinstance(info, ObjectInfo) for info in store.list(""))
        for prefix in ("packs/", "packs/ab", "maps/", "points/", ""):  # the same, without sizes
            assert sorted(store.names(prefix)) == sorted(_listed(store, prefix))

    def test_delete_removes_a_batch_and_ignores_missing_names(self, store):
        for name in ("maps/ab/1.map", "maps/ab/2.map", "points/3.point"):
            store.put(name, b"d")
        store.delete(["maps/ab/1.map", "points/3.point", "maps/ab/never.map", "packs/zz/x.pack"])
        assert _listed(store, "") == {"maps/ab/2.map": 1}
        store.delete([])
        store.delete(iter(["maps/ab/2.map"]))
        assert _listed(store, "") == {}

    # -- names ------------------------------------------------------------------------------
    @pytest.mark.parametrize("bad", BAD_NAMES)
    def test_names_that_could_escape_are_refused(self, store, bad):
        calls = (lambda: store.put(bad, b"x"), lambda: store.get(bad, limit=10),
                 lambda: store.get_range(bad, 0, 1), lambda: store.size(bad),
                 lambda: store.exists(bad), lambda: store.delete([bad]))
        for call in calls:
            with pytest.raises(StoreError, match="not a valid object name"):
                call()
        assert _listed(store, "") == {}

    def test_errors_name_the_store(self, store):
        with pytest.raises(ObjectMissing) as caught:
            store.get("config", limit=10)
        assert store.location in str(caught.value)
