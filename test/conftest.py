"""Shared test fixtures: the ../shared data folder (tests skip with a reason when absent)."""
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SEVEN_SCENES = SHARED / "data" / "7scenes_redkitchen_0000_0499"


def require(path: Path) -> Path:
    """Skip the calling test with a clear reason when a shared dataset is missing."""
    if not path.exists():
        pytest.skip(f"shared data {path} is absent (tests that need ../shared/data skip without it)")
    return path


@pytest.fixture(scope="session")
def seven_scenes() -> Path:
    return require(SEVEN_SCENES)


@pytest.fixture(scope="session")
def small_depth_map(tmp_path_factory, seven_scenes):
    """A real map: 7-Scenes redkitchen frames 0..95 every 5th, with depth."""
    from reloc_ros.datasets import open_dataset
    from reloc_ros.maps import build_map

    ds = open_dataset("7scenes", seven_scenes, frames="0:100:5")
    return build_map(ds, tmp_path_factory.mktemp("maps") / "depth_map")
