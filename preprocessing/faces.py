"""Face boxes -> square crops: MTCNN detection over frame batches, the face to keep, and the crop.

The square crop is the face box grown by `margin`; where it leaves the frame it is shifted inside
(default) or the frame is reflect-padded, never filled with a constant colour (a constant border is a
dataset signature detectors learn).
"""
from __future__ import annotations

from typing import Literal, Sequence

import cv2
import numpy as np

Border = Literal["shift", "reflect"]


def square_box(box: Sequence[float], margin: float) -> tuple[float, float, float, float]:
    """The square around a face box, its side (1 + margin) times the box's longer side."""
    x1, y1, x2, y2 = map(float, box)
    cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1) * (1 + margin) / 2
    return cx - half, cy - half, cx + half, cy + half


def outside_fraction(box: Sequence[float], width: int, height: int) -> float:
    """Fraction of the box's area that lies outside a width x height frame."""
    x1, y1, x2, y2 = box
    area = max(x2 - x1, 1e-9) * max(y2 - y1, 1e-9)
    inside = max(0.0, min(x2, width) - max(x1, 0)) * max(0.0, min(y2, height) - max(y1, 0))
    return float(min(max(1.0 - inside / area, 0.0), 1.0))


def shifted_square(box: Sequence[float], margin: float, width: int, height: int) -> tuple[int, int, int]:
    """(x1, y1, side) of the margin square moved inside a width x height frame; a square bigger than the
    frame shrinks to the frame's shorter side. The crop frame[y1:y1+side, x1:x1+side] is always inside."""
    sq = square_box(box, margin)
    side = max(1, min(int(round(sq[2] - sq[0])), width, height))
    x1, y1 = int(round(sq[0])), int(round(sq[1]))
    return min(max(x1, 0), width - side), min(max(y1, 0), height - side), side


def crop_face(frame: np.ndarray, box: Sequence[float], margin: float = 0.3, size: int = 224,
              border: Border = "shift") -> tuple[np.ndarray, float]:
    """(size x size crop, fraction of the margin box outside the frame). Never pads with a constant."""
    h, w = frame.shape[:2]
    sq = square_box(box, margin)
    frac = outside_fraction(sq, w, h)
    side = int(round(sq[2] - sq[0]))
    x1, y1 = int(round(sq[0])), int(round(sq[1]))
    if border == "shift":
        x1, y1, side = shifted_square(box, margin, w, h)
        crop = frame[y1:y1 + side, x1:x1 + side]
    elif border == "reflect":
        side = max(side, 1)
        left, top = max(0, -x1), max(0, -y1)
        right, bottom = max(0, x1 + side - w), max(0, y1 + side - h)
        padded = cv2.copyMakeBorder(frame, top, bottom, left, right, cv2.BORDER_REFLECT_101) if left + top + right + bottom else frame
        crop = padded[y1 + top:y1 + top + side, x1 + left:x1 + left + side]
    else:
        raise ValueError(f"border must be 'shift' or 'reflect'; got {border!r}")
    interp = cv2.INTER_AREA if crop.shape[0] > size else cv2.INTER_CUBIC
    return cv2.resize(crop, (size, size), interpolation=interp), frac


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of each row of a (n, 4) with one box b (4,)."""
    ix = np.clip(np.minimum(a[:, 2], b[2]) - np.maximum(a[:, 0], b[0]), 0, None)
    iy = np.clip(np.minimum(a[:, 3], b[3]) - np.maximum(a[:, 1], b[1]), 0, None)
    inter = ix * iy
    area = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / np.maximum(area, 1e-9)


def pick_face(boxes: np.ndarray, scores: np.ndarray, previous: np.ndarray | None = None,
              min_score: float = 0.9) -> int | None:
    """Index of the face to keep: the largest, or with `previous` the best-overlapping (then nearest)."""
    ok = np.flatnonzero(scores >= min_score)
    if ok.size == 0:
        return None
    b = boxes[ok]
    if previous is None:
        return int(ok[np.argmax((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))])
    iou = _iou(b, previous)
    if iou.max() > 0:
        return int(ok[np.argmax(iou)])
    centres = (b[:, :2] + b[:, 2:]) / 2
    return int(ok[np.argmin(np.linalg.norm(centres - (previous[:2] + previous[2:]) / 2, axis=1))])


class FaceDetector:
    """MTCNN (keep_all) over a batch of same-size RGB frames -> [(boxes (k, 4), scores (k,)), ...]."""

    def __init__(self, device: str = "cpu", detect_max_side: int = 640) -> None:
        from facenet_pytorch import MTCNN

        self.mtcnn = MTCNN(keep_all=True, device=device, select_largest=True)
        self.detect_max_side = detect_max_side

    def detect(self, frames: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(b, p) for b, p, _ in self.detect_landmarks(frames)]

    def detect_landmarks(self, frames: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per frame: boxes (k, 4), scores (k,), landmarks (k, 5, 2) in frame pixels (MTCNN's order: the
        eye at smaller x, the other eye, nose tip, mouth corner at smaller x, the other mouth corner)."""
        h, w = frames.shape[1:3]
        scale = min(1.0, self.detect_max_side / max(h, w)) if self.detect_max_side else 1.0
        if scale < 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            frames = np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])
        boxes, probs, points = self.mtcnn.detect(np.ascontiguousarray(frames), landmarks=True)
        out = []
        for b, p, pt in zip(boxes, probs, points):
            if b is None:
                out.append((np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2))))
            else:
                out.append((np.asarray(b, dtype=np.float64).reshape(-1, 4) / scale,
                            np.asarray(p, dtype=np.float64).reshape(-1),
                            np.asarray(pt, dtype=np.float64).reshape(-1, 5, 2) / scale))
        return out
