"""gc's repack estimate counts a pack's chunk bytes by the pack's own format: a sealed (major 2)
pack has a longer header and a longer trailer per chunk than a cleartext one, so the estimate
of its unused share must not count them as chunk bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from repo_engine.maintenance.gc import gc
from repo_engine.repository.location import init_repository
from repo_engine.repository.packs import blob_bytes
from restore_helpers import backup_image
from test_encrypted_packs import PASS, SETTINGS, disk_image
from test_crypto_keys import SMALL


@pytest.fixture(params=["encrypted", "cleartext"])
def repo(request, tmp_path):
    keys = {"passphrase": PASS, "kdf": SMALL} if request.param == "encrypted" else {}
    with init_repository(str(tmp_path / "repo"), cache_dir=tmp_path / "cache", shared=True,
                         **SETTINGS, **keys) as repo:
        yield repo


def test_the_chunk_bytes_of_every_pack_are_what_its_trailer_lists(repo, tmp_path):
    disk_image(tmp_path / "a.img", 1, blocks=96)
    backup_image(repo, "web1", tmp_path / "a.img")
    packs = list(repo.objects("packs"))
    assert len(packs) > 1
    for info in packs:
        entries = repo.read_trailer(Path(info.name).name.removesuffix(".pack"))
        assert blob_bytes(info.size, len(entries), bool(repo.config.encryption)) == int(
            entries["stored"].astype("int64").sum())


def test_a_fully_used_pack_is_no_repack_candidate(repo, tmp_path):
    """With every chunk byte of every pack in use, not even --max-unused 0 finds a pack worth
    rewriting (counting the sealed format's overhead as unused chunk bytes did)."""
    disk_image(tmp_path / "a.img", 1, blocks=96)
    backup_image(repo, "web1", tmp_path / "a.img")
    report = gc(repo, max_unused=0.0, dry_run=True)
    assert (report.repack_packs, report.repack_reclaims_bytes) == (0, 0), report
