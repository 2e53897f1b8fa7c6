"""Shared pytest fixtures.

synth_data: a tiny synthetic SYNTH-PEDES dataset, generated once per session (24 ids x 3 images, 128x64,
English + Chinese captions); returns the JSON path as a str. 24 ids so that data.split_records' deterministic
10% identity hold-out (crc32(str(id)) % 1000 < 100) has 5 test ids: 4, 19, 20, 22, 23.
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SYNTH_ARGS = dict(ids=24, images_per_id=3, seed=0, height=128, width=64)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    from tools.make_synthetic_pedes import generate
    return str(generate(tmp_path_factory.mktemp("synth"), **SYNTH_ARGS))
