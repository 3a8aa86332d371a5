"""Frame-by-frame tracking (the official one-stream evaluation pipeline): template memory, boxes mapped back to the
frame and clipped, sequences in parallel, videos and frame folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import modalpeft as mp
from modalpeft.tracking import TMoEConfig
from modalpeft.tracking.data import read_got10k
from modalpeft.tracking.inference import Tracker, evaluate_sequences, read_video
from modalpeft.tracking.transforms import box_in_crop, crop_params

from .test_data import got10k
from .test_models import tiny_tracker

W, H = 80, 60


def frames(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, H, W, generator=g) for _ in range(n)]


class FixedHead(torch.nn.Module):
    """A head that scores the centre token highest and predicts ``box`` (normalised x1, y1, x2, y2) everywhere."""

    def __init__(self, box: torch.Tensor, map_size: tuple[int, int]) -> None:
        super().__init__()
        self.box, self.map_size = box, map_size

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = self.map_size
        score = torch.full((x.shape[0], h, w), -5.0)
        score[:, h // 2, w // 2] = 5.0
        return {"score_map": score, "boxes": self.box.expand(x.shape[0], h, w, 4).clone()}


def test_memory_indices_follow_the_official_segments() -> None:
    tracker = Tracker(tiny_tracker())
    assert [tracker.memory_indices(t) for t in (1, 2, 3)] == [[0, 0, 0], [0, 1, 1], [0, 1, 2]]
    assert tracker.memory_indices(4) == [0, 1, 3]  # dur = 2: {0, dur//2, dur + dur//2}
    assert tracker.memory_indices(10) == [0, 2, 7]  # dur = 5
    assert Tracker(tiny_tracker(), memory="thirds").memory_indices(9) == [0, 3, 6]


def test_a_head_that_predicts_the_last_box_keeps_it() -> None:
    """The head predicts, in the search crop, exactly where the last box lies: mapped back it is that box again."""
    model = tiny_tracker()
    init = np.array([30.0, 20.0, 16.0, 12.0])
    scale, shift = crop_params(init, 5.0, model.search_size)
    inside = box_in_crop(init, scale, shift, model.search_size) / model.search_size[0]
    model.head = FixedHead(torch.tensor(inside, dtype=torch.float32), model.x_size)
    boxes = Tracker(model).track(frames(5), init)
    assert boxes.shape == (5, 4)
    np.testing.assert_allclose(boxes, np.tile(init, (5, 1)), atol=1e-4)


def test_boxes_are_clipped_to_the_frame() -> None:
    model = tiny_tracker()
    model.head = FixedHead(torch.tensor([0.0, 0.0, 1.0, 1.0]), model.x_size)  # the whole 5x search region
    boxes = Tracker(model).track(frames(4), [30.0, 20.0, 16.0, 12.0])
    side = np.sqrt((16 + 2 * 28) * (12 + 2 * 28))  # the search region: area factor 5 around a 16 x 12 box at (38, 26)
    x1, x2 = 38 - side / 2, 38 + side / 2
    np.testing.assert_allclose(boxes[1], [x1, 0.0, x2 - x1, H], atol=1e-4)  # y clipped to the frame, x inside
    np.testing.assert_allclose(boxes[2:], np.tile([0.0, 0.0, W, H], (2, 1)), atol=1e-4)  # larger: clipped both ways


def test_max_scale_change_limits_each_frames_size_step() -> None:
    """A head that always predicts the whole search region: with the limit, the box grows by at most the factor per
    frame around the same centre (official: it jumps to the whole region at once)."""
    model = tiny_tracker()
    model.head = FixedHead(torch.tensor([0.0, 0.0, 1.0, 1.0]), model.x_size)
    init = np.array([30.0, 20.0, 16.0, 12.0])
    boxes = Tracker(model, max_scale_change=1.1).track(frames(3), init)
    np.testing.assert_allclose(boxes[1, 2:], init[2:] * 1.1, atol=1e-4)
    np.testing.assert_allclose(boxes[1, :2] + boxes[1, 2:] / 2, init[:2] + init[2:] / 2, atol=1e-4)
    np.testing.assert_allclose(boxes[2, 2:], init[2:] * 1.1**2, atol=1e-4)
    with pytest.raises(ValueError, match="max_scale_change"):
        Tracker(model, max_scale_change=0.9)


def test_sequences_in_parallel_track_as_one_by_one() -> None:
    model = mp.adapt(tiny_tracker(), TMoEConfig(rank=4), modules_to_save=["head", "embeddings"]).eval()
    tracker = Tracker(model)
    seqs, inits = [frames(6, 1), frames(4, 2)], [[30.0, 20.0, 16.0, 12.0], [10.0, 10.0, 20.0, 20.0]]
    together = tracker.track_batch(seqs, inits, with_scores=True)
    for seq, init, (boxes, scores) in zip(seqs, inits, together, strict=True):
        alone = tracker.track(seq, init)
        np.testing.assert_allclose(boxes, alone, atol=1e-4)
        assert len(boxes) == len(seq) and scores[0] == 1.0 and ((scores > 0) & (scores <= 1)).all()
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= W + 1e-6).all()


def test_bad_init_boxes_and_empty_sequences() -> None:
    tracker = Tracker(tiny_tracker())
    with pytest.raises(ValueError, match=r"init box of sequence 0: box \[100.0, 5.0, 10.0, 10.0\] lies outside"):
        tracker.track(frames(2), [100.0, 5.0, 10.0, 10.0])
    with pytest.raises(ValueError, match="non-positive width or height"):
        tracker.track(frames(2), [10.0, 5.0, 0.0, 10.0])
    with pytest.raises(ValueError, match="sequence 0 has no frames"):
        tracker.track([], [10.0, 5.0, 10.0, 10.0])
    with pytest.raises(TypeError, match="holds no OneStreamTracker"):
        Tracker(torch.nn.Linear(2, 2))


def test_read_video_and_frame_folders(tmp_path) -> None:
    import av
    from PIL import Image

    path = tmp_path / "clip.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(4):
            image = np.full((48, 64, 3), 30 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    decoded = list(read_video(path))
    assert len(decoded) == 4 and decoded[0].shape == (3, 48, 64)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((10, 12, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    assert len(list(read_video(folder))) == 3
    (folder / "0001.png").write_bytes(b"corrupt")  # a corrupt frame in the middle is reported with its path
    with pytest.raises(ValueError, match=r"frame .*0001.png cannot be read"):
        list(read_video(folder))
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match=r"broken.mp4 cannot be opened by PyAV"):
        read_video(tmp_path / "broken.mp4")


def test_evaluate_sequences_scores_the_visible_frames(tmp_path) -> None:
    (sequence,) = read_got10k(got10k(tmp_path), "val")  # 8 frames, absent at 3, fully covered at 5
    model = tiny_tracker()
    scale, shift = crop_params(sequence.boxes[0], 5.0, model.search_size)
    inside = box_in_crop(sequence.boxes[0], scale, shift, model.search_size) / model.search_size[0]
    model.head = FixedHead(torch.tensor(inside, dtype=torch.float32), model.x_size)  # keeps the first box
    result = evaluate_sequences(Tracker(model), [sequence], "got10k")
    assert result.num_frames == 5  # frames 1..7 without 3 and 5
    truth = sequence.boxes[[1, 2, 4, 6, 7]]
    first = sequence.boxes[0]
    x1, x2 = np.maximum(truth[:, 0], first[0]), np.minimum(truth[:, 0] + truth[:, 2], first[0] + first[2])
    inter = np.clip(x2 - x1, 0, None) * first[3]  # same y and size, the square moves 3 px right per frame
    expected = inter / (2 * first[2] * first[3] - inter)
    assert result.ao == pytest.approx(expected.mean(), abs=1e-4)
    ope = evaluate_sequences(Tracker(model), [sequence], "ope")
    assert 0 < ope.success_auc < 1
    sequence.boxes = sequence.boxes[:1]
    with pytest.raises(ValueError, match="only their first box"):
        evaluate_sequences(Tracker(model), [sequence])


def test_the_window_penalty_follows_the_official_post_processing() -> None:
    """trackit's box_with_score_map: ``(1 - p) · sigmoid(score) + p · outer(hann(H), hann(W))`` (symmetric Hann,
    ``periodic=False``) picks the token; the confidence is the unpenalised score there."""
    import math

    from modalpeft.tracking.losses import hann_window, select_box

    h, w = 5, 6

    def hann(n: int) -> torch.Tensor:  # 0.5 (1 - cos(2 pi k / (n - 1))), zero at both ends
        return 0.5 * (1 - torch.cos(2 * math.pi * torch.arange(n, dtype=torch.float32) / (n - 1)))

    torch.testing.assert_close(hann_window((h, w)), torch.outer(hann(h), hann(w)))
    score = torch.full((1, 1, h, w), -4.0)
    score[0, 0, 0, 0], score[0, 0, 2, 3] = 3.0, 1.0  # the best raw score sits at a corner, where the window is 0
    boxes = torch.arange(h * w * 4, dtype=torch.float32).reshape(1, h, w, 4)
    box, confidence = select_box({"score_map": score, "boxes": boxes}, window_penalty=0.45)
    torch.testing.assert_close(box[0], boxes[0, 2, 3])  # the window moves the pick to the centre's neighbour
    torch.testing.assert_close(confidence, torch.sigmoid(torch.tensor([1.0])))
    box, confidence = select_box({"score_map": score, "boxes": boxes}, window_penalty=0.0)
    torch.testing.assert_close(box[0], boxes[0, 0, 0])
    torch.testing.assert_close(confidence, torch.sigmoid(torch.tensor([3.0])))
