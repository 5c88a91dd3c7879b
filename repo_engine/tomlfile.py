"""Reading a settings file a user wrote in TOML (the S3 settings, a vSphere job's config): a
bounded read, so that neither a huge file nor a device like /dev/zero can exhaust memory, and
every way its content can fail to decode one exception."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

MAX_SIZE = 1 << 20  # far more than any settings file


class NotToml(ValueError):
    """The file is not a TOML document (too large, not UTF-8, bad syntax); the message says
    which."""


def read_toml(path: Path) -> tuple[dict[str, Any], int]:
    """The document in `path` and the file's mode (of the file read: no other file can have
    taken its name between). OSError when it cannot be read."""
    with open(path, "rb") as f:
        data = f.read(MAX_SIZE + 1)
        mode = os.fstat(f.fileno()).st_mode
    if len(data) > MAX_SIZE:
        raise NotToml(f"is larger than any settings file ({MAX_SIZE} bytes)")
    try:
        return tomllib.loads(data.decode()), mode
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise NotToml(f"is not valid TOML: {exc}") from None
    except ValueError:  # Python's guard against integers of thousands of digits
        raise NotToml("holds a number of thousands of digits, which no setting takes") from None
    except RecursionError:
        raise NotToml("is nested too deeply to be a settings file") from None
