"""Shared test fixtures: the ../shared data folder (tests skip with a reason when absent)."""
import logging
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


@pytest.fixture(scope="session")
def room_map_and_queries(tmp_path_factory):
    """A rendered-room map (20 keyframes, 320x240; no shared data needed) and 6 query frames
    with exact poses: what the launch tests localize against."""
    from reloc_ros.demo.scene import ProceduralRoom, RoomConfig, demo_camera, orbit_poses, render_frames
    from reloc_ros.maps import MapBuildConfig, build_map

    scene = ProceduralRoom(RoomConfig(texel_m=0.006))
    cam = demo_camera(320, 240, 262.5)
    frames = render_frames(scene, orbit_poses(scene, 20), cam, "kf_")
    map_dir = build_map(frames, tmp_path_factory.mktemp("room") / "map", MapBuildConfig())
    queries = render_frames(scene, orbit_poses(scene, 6, radius_scale=0.9, phase=0.2, seed=5, jitter=0.5), cam, "q_")
    return map_dir, queries


@pytest.fixture(autouse=True)
def _reloc_ros_logs_reach_caplog():
    """The launch pytest plugins (loaded in every run) install launch's logger class, whose
    loggers do not propagate to the root logger; caplog only sees reloc_ros's records when
    they do."""
    for name, lg in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith("reloc_ros") and isinstance(lg, logging.Logger):
            lg.propagate = True
    yield
