"""What maintenance takes from a listing of the store (`inventory.list_store`): an object of a
kind by its stem when its name is one the repository gives (the kind's suffix after lowercase
hex of the kind's length, in the kind's directory or one below), a name with the kind's suffix
and another stem described as left alone, any other name ignored; gc deletes none of them."""

from __future__ import annotations

from helpers import cli, restore_bytes
from repo_engine.maintenance.inventory import list_store, objects_under
from repo_engine.repository.repo import Repository
from test_gc_temp_files import backed_up

STRAY = {  # path under the repository: described in `skipped` (the kind's suffix)
    "maps/ab/" + "A" * 64 + ".map": True,       # uppercase hex
    "maps/" + "a" * 63 + ".map": True,          # one digit short
    "points/" + "0" * 16 + "x.point": True,     # a letter past the stem
    "packs/" + "g" * 64 + ".pack": True,        # not hex
    "maps/ab/" + "a" * 64 + ".map.map": True,   # the suffix twice
    "maps/ab/" + "a" * 64 + ".mapx": False,     # another suffix: ignored
    "points/README": False,
}


def test_a_listing_takes_the_repository_names_and_leaves_the_others(tmp_path, capsys):
    repo, point, content = backed_up(tmp_path, capsys)
    for name in STRAY:
        (repo / name).parent.mkdir(exist_ok=True)
        (repo / name).write_bytes(b"?")
    flat = "b" * 64
    (repo / "maps" / f"{flat}.map").write_bytes(b"?")  # the kind's directory itself: taken
    with Repository.open(repo) as opened:
        skipped: list[str] = []
        listing = list_store(opened, skipped)
        maps = objects_under(opened, "maps")
        assert maps[flat].name == f"maps/{flat}.map" and maps[flat].size == 1
        assert sorted(listing.maps) == sorted(maps) and listing.points == [point]
        assert [info.size for info in listing.packs.values()] == [
            (repo / info.name).stat().st_size for info in listing.packs.values()]
        assert len(listing.packs) == 1
        assert all(len(stem) == 64 and stem == stem.lower() for stem in maps)
        assert sorted(skipped) == sorted(
            f"{opened.store.location}/{name} does not have a repository object name: left "
            "alone, never read (remove it)" for name, told in STRAY.items() if told)
        again: list[str] = []
        assert objects_under(opened, "maps", again) == maps
        assert sorted(again) == sorted(s for s in skipped if "/maps/" in s)
    assert cli(capsys, "gc", repo).code == 0
    assert all((repo / name).exists() for name in STRAY)
    assert restore_bytes(capsys, repo, point, "sda", tmp_path / "out.img") == content
