import cv2
import numpy as np
import pytest

from reloc_ros.features import (FeatureConfig, SiftExtractor, match_descriptors, match_descriptors_both, root_sift,
                                to_grey)
from reloc_ros.types import InvalidInputError


def _image(seven_scenes, n=100):
    bgr = cv2.imread(str(seven_scenes / f"frame-{n:06d}.color.jpg"))
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def test_keypoints_follow_a_known_homography(seven_scenes):
    img = _image(seven_scenes)
    H = np.array([[0.92, 0.08, 25.0], [-0.06, 0.97, 12.0], [0.0, 0.0, 1.0]])
    warped = cv2.warpPerspective(img, H, (img.shape[1], img.shape[0]), flags=cv2.INTER_LINEAR)
    ex = SiftExtractor()
    fa, fb = ex(img), ex(warped)
    m = match_descriptors(fa.root(), fb.root())
    assert len(m) > 300
    proj = cv2.perspectiveTransform(fa.keypoints[m[:, 0]].reshape(-1, 1, 2).astype(np.float64), H).reshape(-1, 2)
    err = np.linalg.norm(proj - fb.keypoints[m[:, 1]], axis=1)
    assert np.median(err) < 0.5  # sub-pixel keypoints
    assert np.mean(err < 2.0) > 0.9  # matches are overwhelmingly correct


def test_downscaled_extraction_reports_full_resolution_pixels(seven_scenes):
    img = _image(seven_scenes)
    full = SiftExtractor(FeatureConfig(max_image_size=640))(img)
    half = SiftExtractor(FeatureConfig(max_image_size=320))(img)
    m = match_descriptors(half.root(), full.root())
    err = np.linalg.norm(half.keypoints[m[:, 0]] - full.keypoints[m[:, 1]], axis=1)
    assert len(m) > 100 and np.median(err) < 1.0


def test_max_keypoints_and_rootsift_norm(seven_scenes):
    f = SiftExtractor(FeatureConfig(max_keypoints=100))(_image(seven_scenes))
    assert len(f) == 100 and f.descriptors.dtype == np.uint8
    np.testing.assert_allclose(np.linalg.norm(root_sift(f.descriptors), axis=1), 1.0, atol=1e-5)


def _sorted(m):
    return m[np.lexsort((m[:, 1], m[:, 0]))]


def test_one_gemm_matches_both_directions_and_row_subsets_match_the_full_result(seven_scenes):
    a = SiftExtractor()(_image(seven_scenes, 100)).root()
    b = SiftExtractor()(_image(seven_scenes, 115)).root()
    ab, ba = match_descriptors_both(a, b)
    assert len(ab) > 200 and len(ba) > 200
    np.testing.assert_array_equal(ab, match_descriptors(a, b))
    # the reverse ratio test uses the other image's second best: a different set, same rules
    np.testing.assert_array_equal(_sorted(ba), _sorted(match_descriptors(b, a)))
    assert not np.array_equal(_sorted(ab), _sorted(ba[:, ::-1]))
    rows = np.nonzero(np.random.default_rng(0).random(len(a)) < 0.3)[0]
    sub = match_descriptors(a, b, rows=rows)
    np.testing.assert_array_equal(sub, ab[np.isin(ab[:, 0], rows)])
    assert match_descriptors(a, b, rows=rows[:0]).shape == (0, 2)
    # without the mutual check the subset still equals the full result restricted to it
    full = match_descriptors(a, b, mutual=False)
    np.testing.assert_array_equal(match_descriptors(a, b, mutual=False, rows=rows), full[np.isin(full[:, 0], rows)])


def test_blank_image_gives_no_features_and_no_matches():
    f = SiftExtractor()(np.full((480, 640, 3), 128, np.uint8))
    assert len(f) == 0
    assert match_descriptors(f.root(), np.ones((5, 128), np.float32)).shape == (0, 2)


@pytest.mark.parametrize("bad", [np.zeros((0, 0, 3), np.uint8), np.zeros((4, 4, 5), np.uint8),
                                 np.zeros((4, 4), np.float32)])
def test_unusable_images_raise_clear_errors(bad):
    with pytest.raises(InvalidInputError):
        to_grey(bad)


@pytest.mark.parametrize("image_scale", [1.0, 0.75, 0.5, 0.53])  # 0.53: a size that rounds (339.2 x 254.4)
def test_keypoints_are_unbiased_under_mirroring(seven_scenes, image_scale):
    """A keypoint at x in an image must come back at W-1-x in its mirror image (pixel centres
    at integer coordinates), at every extraction scale. Half the difference of a keypoint and
    its mirrored twin is the extractor's own offset, without any ground truth: OpenCV's
    default SIFT upscaling puts it at +0.25 px / image_scale, which biases depth points, map
    triangulation and the query alike (the 0.5 px at scale 0.5 is what the map of a
    1536-pixel image and a query at 0.75 of it would see)."""
    from scipy.spatial import cKDTree

    img = _image(seven_scenes)
    h, w = img.shape[:2]
    ex = SiftExtractor(FeatureConfig(image_scale=image_scale))
    a = ex(img).keypoints
    for axis, flip, size in ((0, 1, w), (1, 0, h)):
        b = ex(cv2.flip(img, flip)).keypoints.copy()
        b[:, axis] = size - 1 - b[:, axis]  # a twin at x + bias comes back at x - bias
        d, j = cKDTree(b).query(a, k=1)
        ok = d < 1.0
        assert ok.sum() > 100
        bias = (a[ok, axis] - b[j[ok], axis]) / 2.0
        assert abs(float(np.median(bias))) < 0.02, (axis, float(np.median(bias)))
