"""Per-frame face features from the landmarker's output on the rendered frames."""
from __future__ import annotations

from typing import Iterable, Tuple

import numpy as np

from beam_pipeline.elements import FaceResult, RenderedClip
from model_handlers.mediapipe_face import NUM_BLENDSHAPES, NUM_LANDMARKS


def pose_from_matrix(matrix: np.ndarray) -> np.ndarray:
  """Yaw, pitch, roll in degrees from MediaPipe's facial transformation matrix (R = Rz Ry Rx)."""
  r = np.asarray(matrix, np.float64)[:3, :3]
  r = r / np.linalg.norm(r, axis=0, keepdims=True)
  pitch = np.degrees(np.arctan2(r[2, 1], r[2, 2]))
  yaw = np.degrees(np.arctan2(-r[2, 0], np.hypot(r[2, 1], r[2, 2])))
  roll = np.degrees(np.arctan2(r[1, 0], r[0, 0]))
  return np.array([yaw, pitch, roll], np.float32)


def frame_arrays(num_frames: int, faces: Iterable[Tuple[int, FaceResult]]) -> dict:
  """Stack per-frame results (largest face) into T-length arrays; NaN where no face was found."""
  landmarks = np.full((num_frames, NUM_LANDMARKS, 3), np.nan, np.float32)
  blendshapes = np.full((num_frames, NUM_BLENDSHAPES), np.nan, np.float32)
  pose = np.full((num_frames, 3), np.nan, np.float32)
  bbox = np.full((num_frames, 4), np.nan, np.float32)
  for index, face in faces:
    if index >= num_frames or not face.num_faces:
      continue
    landmarks[index] = face.landmarks[0]
    blendshapes[index] = face.blendshapes[0]
    pose[index] = pose_from_matrix(face.matrices[0])
    bbox[index] = face.boxes()[0]
  return {'landmarks': landmarks, 'blendshapes': blendshapes, 'pose': pose, 'bbox': bbox}


def face_statistics(arrays: dict, clip: RenderedClip) -> dict:
  """Summary numbers kept in every sample's json (output pixels unless named `source_`)."""
  bbox = arrays['bbox']
  present = ~np.isnan(bbox[:, 0])
  stats = {'face_frames': int(present.sum()), 'face_ratio': float(present.mean()) if len(present) else 0.0}
  if present.any():
    boxes = bbox[present]
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)
    sizes = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    window_side = clip.task.window[2]
    stats.update({
        'face_centre': [round(float(v), 2) for v in centres.mean(0)],
        'face_size': round(float(np.median(sizes)), 2),
        'source_face_size': round(float(np.median(sizes)) * window_side / clip.size, 2),
    })
  return stats
