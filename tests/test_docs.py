"""The documents agree with what the code does: repository layout, exit codes."""

from __future__ import annotations

import re
from pathlib import Path

from helpers import cli

ROOT = Path(__file__).parent.parent


def _layout_table() -> str:
    text = (ROOT / "docs" / "FORMAT.md").read_text()
    return text[text.index("| path | what | written by |"):].split("\n\n", 1)[0]


def test_format_layout_lists_every_top_level_entry(tmp_path, capsys):
    from repo_engine.repository.crypto.null import NULL_SEALER
    from repo_engine.repository.store.local import LocalStore
    from repo_engine.sources.vsphere.marks import mark_written

    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo).code == 0
    mark_written(LocalStore(repo), NULL_SEALER, "uuid-1", "web1",
                 "a restore wrote to the VM")   # vSphere adds
    table = _layout_table()
    for entry in sorted(p.name for p in repo.iterdir()):
        assert re.search(rf"\| `{re.escape(entry)}[/`]", table), f"{entry} not in docs/FORMAT.md"


def test_exit_codes_are_documented_where_users_look():
    from repo_engine import errors

    codes = {cls.exit_code for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, errors.RepoError)}
    assert codes == {1, 2, 3}
    for doc in ("README.md", "docs/VSPHERE.md"):
        text = (ROOT / doc).read_text()
        for code in codes | {0, 130}:
            assert re.search(rf"^\| {code} \|", text, re.M), f"exit code {code} not in {doc}"


def test_readme_s3_settings_example_is_a_valid_settings_file(tmp_path):
    from repo_engine.repository.store.s3_settings import load_s3_settings

    text = (ROOT / "README.md").read_text()
    block = text[text.index("      [s3]\n"):].split("\n\n", 1)[0]
    settings = tmp_path / "s3.toml"
    settings.write_text("\n".join(line[6:] for line in block.splitlines()))
    settings.chmod(0o600)
    loaded = load_s3_settings(environ={}, config_file=settings)
    assert loaded.endpoint == "https://s3.example.com" and loaded.max_attempts == 6
