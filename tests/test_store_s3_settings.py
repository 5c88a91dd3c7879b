"""S3 store settings: where each key comes from, what is refused, that no secret leaks, and that
the S3 client library is imported only for an s3:// location."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from repo_engine.repository.store import StoreError
from repo_engine.repository.store.s3_settings import MIB, BadSettings, S3Settings, load_s3_settings

ENV = {"AWS_ACCESS_KEY_ID": "AKENV", "AWS_SECRET_ACCESS_KEY": "env-secret",
       "AWS_ENDPOINT_URL": "http://env:9000", "AWS_REGION": "eu-west-3"}


def write_config(tmp_path, text: str, mode: int = 0o600):
    path = tmp_path / "s3.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_overrides_then_environment_then_file_then_defaults(tmp_path):
    path = write_config(tmp_path, '[s3]\nendpoint = "http://file:1"\nregion = "file-region"\n'
                                  'multipart_part_size = 8388608\nca_bundle = "/etc/ca.pem"\n')
    s = load_s3_settings({"endpoint": "http://flag:2", "region": None}, ENV, path)
    assert (s.endpoint, s.region, s.ca_bundle) == ("http://flag:2", "eu-west-3", "/etc/ca.pem")
    assert (s.access_key_id, s.secret_access_key) == ("AKENV", "env-secret")
    assert s.multipart_part_size == 8 * MIB and s.multipart_threshold == 64 * MIB
    assert load_s3_settings({}, {}, path).endpoint == "http://file:1"


def test_config_file_found_by_environment(tmp_path):
    path = write_config(tmp_path, '[s3]\nregion = "by-env"\n')
    assert load_s3_settings({}, {"REPO_ENGINE_S3_CONFIG": str(path)}).region == "by-env"
    xdg = tmp_path / "xdg"
    (xdg / "repo-engine").mkdir(parents=True)
    (xdg / "repo-engine" / "s3.toml").write_text('[s3]\nregion = "by-xdg"\n')
    assert load_s3_settings({}, {"XDG_CONFIG_HOME": str(xdg)}).region == "by-xdg"
    assert load_s3_settings({}, {"XDG_CONFIG_HOME": str(tmp_path / "none")}).region == "us-east-1"


def test_secret_in_a_file_others_can_read_is_refused(tmp_path):
    path = write_config(tmp_path, '[s3]\naccess_key_id = "AK"\nsecret_access_key = "s"\n',
                        mode=0o644)
    with pytest.raises(StoreError, match=f"holds a secret and is readable by others; run: chmod "
                                         f"600 {path}$"):
        load_s3_settings({}, {}, path)
    path.chmod(0o600)
    assert load_s3_settings({}, {}, path).secret_access_key == "s"


@pytest.mark.parametrize("text, message", [
    ('[s3]\nendpont = "http://x"\n', "unknown S3 setting endpont"),
    ("[s3]\nendpoint = \n", "is not valid TOML"),
    ('[s3]\nendpoint = "x:9000"\n', "must start with http:// or https://"),
    ('[s3]\naddressing_style = "dns"\n', "addressing_style must be one of path, virtual"),
    ("[s3]\nmultipart_part_size = 1024\n", "multipart_part_size must be from 5242880"),
    ('[s3]\naccess_key_id = "AK"\n', "must be given together"),
    ("[s3]\nendpoint = 9000\n", "endpoint must be a string"),
    ('[s3]\nverify_tls = "no"\n', "verify_tls must be true or false"),
    ("[s3]\nmax_attempts = 2.5\n", "max_attempts must be an integer"),
    ("[s3]\nmax_attempts = true\n", "max_attempts must be an integer"),
    ("[s3]\nregion = [1]\n", "region must be a string"),
    ("[s3]\nbackoff_base = nan\n", "must be positive and finite"),
    ("[s3]\nbackoff_cap = inf\n", "must be positive and finite"),
    ('[s3]\nendpoint = "http://127.0.0.1:99999"\n', "is not a valid URL"),
    ('[s3]\nendpoint = "http://"\n', "names no host"),
    ('[s3]\naccess_key_id = "clé"\nsecret_access_key = "s"\n', "access_key_id must be ASCII"),
])
def test_bad_settings_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(BadSettings, match=message) as excinfo:
        load_s3_settings({}, {}, write_config(tmp_path, text))
    assert "\n" not in str(excinfo.value)
    assert excinfo.value.exit_code == 2 and isinstance(excinfo.value, StoreError)


def test_a_bad_value_is_named_with_where_it_was_set(tmp_path):
    """The file and key, the environment variable or the command line: where to correct it."""
    path = write_config(tmp_path, '[s3]\nmax_attempts = 0\naccess_key_id = "AK"\n')
    with pytest.raises(BadSettings) as excinfo:
        load_s3_settings({"endpoint": "x:1"}, {"AWS_REGION": "r", "AWS_ENDPOINT_URL": "y:1",
                                               "AWS_SECRET_ACCESS_KEY": "s"}, path)
    assert str(excinfo.value) == (
        "bad S3 settings: endpoint 'x:1' must start with http:// or https:// (endpoint from the "
        "command line); max_attempts must be at least 1 (max_attempts from the S3 settings file "
        f"{path})")
    with pytest.raises(BadSettings, match=r"must start with http:// or https:// \(endpoint from "
                                          r"\$AWS_ENDPOINT_URL_S3\)$"):
        load_s3_settings({}, {**ENV, "AWS_ENDPOINT_URL_S3": "y:1", "AWS_ENDPOINT_URL": "z"})


def test_a_wrong_type_is_named_without_its_value(tmp_path):
    with pytest.raises(StoreError, match="secret_access_key must be a string") as excinfo:
        load_s3_settings({}, {}, write_config(
            tmp_path, '[s3]\naccess_key_id = "AK"\nsecret_access_key = 123456789\n'))
    assert "123456789" not in str(excinfo.value)


def test_a_settings_file_is_never_read_whole_when_it_cannot_be_one(tmp_path):
    with pytest.raises(StoreError, match="/dev/zero is larger than any settings file"):
        load_s3_settings({}, {}, Path("/dev/zero"))
    path = write_config(tmp_path, "")
    path.write_bytes(b"[s3]\nregion = '\xff'\n")  # not UTF-8
    with pytest.raises(StoreError, match="is not valid TOML"):
        load_s3_settings({}, {}, path)


@pytest.mark.parametrize("variable, message", [
    ("AWS_ENDPOINT_URL", "endpoint must be ASCII text"),
    ("AWS_REGION", "region must be UTF-8 text"),
    ("AWS_ACCESS_KEY_ID", "access_key_id must be ASCII text"),
    ("AWS_SECRET_ACCESS_KEY", "secret_access_key must be UTF-8 text"),
])
def test_an_environment_value_that_is_not_utf8(variable, message):
    """Bytes that are not UTF-8 reach Python as surrogates, which no request can carry."""
    environ = {**ENV, variable: "http://h:1/\udcff"}
    with pytest.raises(StoreError, match=message) as excinfo:
        load_s3_settings({}, environ)
    assert "udcff" not in str(excinfo.value)


def test_missing_config_file_named(tmp_path):
    with pytest.raises(StoreError, match=f"cannot read the S3 settings file {tmp_path / 'x'}"):
        load_s3_settings({}, {"REPO_ENGINE_S3_CONFIG": str(tmp_path / "x")})


def test_addressing_style_follows_the_endpoint():
    assert S3Settings().style == "virtual"
    assert S3Settings(endpoint="http://h:1").style == "path"
    assert S3Settings(endpoint="http://h:1", addressing_style="virtual").style == "virtual"


def test_no_secret_in_repr():
    s = load_s3_settings({}, {**ENV, "AWS_SESSION_TOKEN": "token-secret"})
    assert "env-secret" not in repr(s) and "token-secret" not in repr(s) and "AKENV" in repr(s)


def test_s3_client_imported_only_for_s3_locations():
    code = ("import sys; from repo_engine.repository.store import open_store, StoreError\n"
            "assert 'botocore' not in sys.modules\n"
            "sys.modules['botocore'] = None  # as if the s3 extra were not installed\n"
            "try:\n    open_store('s3://bucket/p')\n"
            "except StoreError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("cannot open s3://bucket/p: S3 support is not installed")
    assert out.stdout.rstrip().endswith("install repo-engine with the 's3' extra")


def test_s3_store_loads_botocore_alone():
    """boto3's layer (and s3transfer under it) is never used: importing it cost every command on
    object storage some 50 ms of its start-up."""
    code = ("import sys; from repo_engine.repository.store import open_store\n"
            "from repo_engine.repository.store.s3_settings import S3Settings\n"
            "store = open_store('s3://bucket/p', S3Settings(endpoint='http://127.0.0.1:9', "
            "access_key_id='a', secret_access_key='b'))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('boto3', 's3transfer', 'botocore'))[:1], "
            "[m for m in sys.modules if m.split('.')[0] in ('boto3', 's3transfer')])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['botocore'] []"


@pytest.mark.parametrize("text, message", [
    ("[s3]\nmultipart_part_size = 6442450944\n", "multipart_part_size must be from"),
    ("[s3]\nmultipart_threshold = 6442450944\n", "multipart_threshold must be at least"),
    ("[s3]\nmultipart_concurrency = 64\nmultipart_part_size = 1073741824\n"
     "multipart_threshold = 1073741824\n", "held in memory at once"),
    ("[s3]\nmultipart_concurrency = 65\n", "multipart_concurrency must be at most 64"),
    ("[s3]\nmax_attempts = 1000000000\n", "max_attempts must be at most 100"),
    ("[s3]\nlist_page_size = 1001\n", "list_page_size must be at most 1000"),
    ("[s3]\nread_timeout = 1e300\n", "at most 3600 seconds"),
    ("[s3]\nbackoff_cap = 3601\n", "at most 3600 seconds"),
    ("[s3]\nmax_attempts = 99999999999999999999999\n", "max_attempts must be at most 100"),
    (f'[s3]\nendpoint = "{"x" * 100_000}"\n', "(100000 characters)"),
])
def test_settings_past_their_bounds_are_refused(tmp_path, text, message):
    with pytest.raises(StoreError, match=re.escape(message)) as excinfo:
        load_s3_settings({}, {}, write_config(tmp_path, text))
    assert "\n" not in str(excinfo.value) and len(str(excinfo.value)) < 1000


def test_settings_at_their_bounds_are_taken(tmp_path):
    text = ("[s3]\nmultipart_concurrency = 64\nmax_attempts = 100\nlist_page_size = 1000\n"
            "read_timeout = 3600\nmultipart_part_size = 67108864\n")
    assert load_s3_settings({}, {}, write_config(tmp_path, text)).max_attempts == 100


@pytest.mark.parametrize("key", ["spool_dir", "ca_bundle", "region"])
def test_a_nul_in_a_setting_is_refused(tmp_path, key):
    with pytest.raises(StoreError, match=f"{key} must not hold a NUL character"):
        load_s3_settings({}, {}, write_config(tmp_path, f'[s3]\n{key} = "a\\u0000b"\n'))
