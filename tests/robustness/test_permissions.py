"""Files and folders cmhash writes get the mode the umask allows, as any other writer's would,
so another user (a service account, a web server) can read an index or a bundle."""

import os
import stat

import numpy as np
import pytest

from cmhash import HashIndex
from cmhash.files import atomic_write, temp_dir_beside


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_and_folders_follow_the_umask(tmp_path, umask):
    atomic_write(tmp_path / "a.json", b"{}")
    assert mode(tmp_path / "a.json") == 0o666 & ~umask
    index = HashIndex(32)
    index.add(np.zeros((2, 4), np.uint8))
    index.save(tmp_path / "i.cmhidx")
    assert mode(tmp_path / "i.cmhidx") == 0o666 & ~umask
    folder = temp_dir_beside(tmp_path / "bundle")
    assert mode(folder) == 0o777 & ~umask
