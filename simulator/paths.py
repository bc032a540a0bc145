"""Path-valued settings (``output.dir``, ``dataset.path``, ``--out``, ...): text the filesystem can
take. A NUL character, a name longer than the filesystem allows or a character the system cannot
encode would otherwise surface as a ``ValueError``/``OSError`` deep inside ``pathlib``; here they
become a clear error on the field (exit 2).

Where results may go is a separate rule (see ``engine.runner.default_run_dir``): ``output.dir``
and ``--out`` are the user's explicit choice and are taken as given; everything below them is
built from validated name components only.
"""

from __future__ import annotations

import os
from typing import Annotated

from pydantic import AfterValidator

from .errors import UserError

MAX_PATH_BYTES = 4096  # Linux PATH_MAX
MAX_NAME_BYTES = 255  # NAME_MAX of the common filesystems


def path_problem(value: str) -> str | None:
    """Why ``value`` cannot be a path on this system (None if it can)."""
    if "\x00" in value:
        return "contains a NUL character"
    try:
        raw = os.fsencode(value)
    except UnicodeError:
        return "contains characters that this system cannot use in file names"
    if len(raw) > MAX_PATH_BYTES:
        return f"is longer than {MAX_PATH_BYTES} bytes"
    for part in raw.replace(b"\\", b"/").split(b"/"):
        if len(part) > MAX_NAME_BYTES:
            return f"has a folder or file name longer than {MAX_NAME_BYTES} bytes ({os.fsdecode(part[:24])}...)"
    return None


def _checked(value: str) -> str:
    problem = path_problem(value)
    if problem:
        raise ValueError(f"this path {problem}")
    return value


# a str field holding a filesystem path
PathText = Annotated[str, AfterValidator(_checked)]


def check_path_arg(value: str | None, flag: str) -> None:
    """A path given on the command line (``--out``, ``--resume``): a clear error if unusable."""
    if value is None:
        return
    problem = path_problem(value)
    if problem:
        raise UserError.single(flag, flag, f"the path {problem}")


# names of weights that ship inside an installed package, accepted by ``model.pretrained`` in
# place of a file (the backbone's registry entry says which it has: efficientnet_lite0's imagenet)
PACKAGED_WEIGHTS = ("imagenet",)
