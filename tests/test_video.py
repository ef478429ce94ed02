"""Frame extraction against the official OpenCV + PIL procedure, and the loader's transform."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import DATA
from PIL import Image

from input_pipeline import video

CLIPS = ["00W1lcxW-WU_40.000.mp4", "KlsG1EnBEjc_000361.mp4"]


def official_frames(path) -> np.ndarray:
    """``extract_video_frame.py`` with OpenCV, and torchvision's Resize / CenterCrop done by PIL."""
    cap = cv2.VideoCapture(str(path))
    fps = cap.get(cv2.CAP_PROP_FPS)
    total = min(int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), int(fps * 10))
    frames = []
    for i in range(10):
        cap.set(cv2.CAP_PROP_POS_FRAMES, int(i * total / 10) - 1)
        ok, bgr = cap.read()
        assert ok
        image = Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        w, h = image.size
        new = (224, int(224 * h / w)) if w <= h else (int(224 * w / h), 224)
        image = image.resize(new, Image.BILINEAR)
        left, top = int(round((new[0] - 224) / 2.0)), int(round((new[1] - 224) / 2.0))
        frames.append(np.asarray(image.crop((left, top, left + 224, top + 224))))
    return np.stack(frames)


@pytest.mark.parametrize("name", CLIPS)
def test_frames_equal_the_official_extraction_bit_for_bit(name):
    ours = video.extract_frames(DATA / name)
    assert ours.shape == (10, 224, 224, 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, official_frames(DATA / name))


def test_frame_indices_follow_the_official_seek():
    assert video.frame_indices(125) == [0, 11, 24, 36, 49, 61, 74, 86, 99, 111]
    assert video.frame_indices(299)[-1] == 268


def test_jpeg_round_trip_is_close():
    frames = video.extract_frames(DATA / CLIPS[0])
    data = video.encode_jpeg(frames[5])
    assert data[:2] == b"\xff\xd8"
    decoded = video.decode_jpeg(data)
    assert decoded.shape == (224, 224, 3)
    assert np.abs(decoded.astype(int) - frames[5]).mean() < 4


def test_preprocess_frame_is_imagenet_normalised_nhwc():
    frame = np.zeros((224, 224, 3), np.uint8)
    frame[..., 0] = 255
    out = video.preprocess_frame(frame)
    assert out.shape == (224, 224, 3) and out.dtype == np.float32
    np.testing.assert_allclose(
        out[0, 0], [(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225], rtol=1e-6
    )


def test_preprocess_resizes_the_shorter_side_bicubic_and_crops():
    frame = np.random.default_rng(0).integers(0, 255, (300, 400, 3), np.uint8)
    out = video.preprocess_frame(frame)
    expected = np.asarray(Image.fromarray(frame).resize((298, 224), Image.BICUBIC))[:, 37:261]
    np.testing.assert_allclose(
        out, (expected / 255.0 - video.IMAGENET_MEAN) / video.IMAGENET_STD, rtol=1e-5, atol=1e-6
    )


def test_unreadable_and_audio_only_files_are_reported(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(video.VideoError, match="junk.mp4"):
        video.extract_frames(junk)
