"""Golden fixture for reel's video preprocessing, from transformers' Qwen2VLVideoProcessor.

Writes into OUT_DIR (default fixtures/video):
  qwen2vl_video.safetensors
    exact_frames     [3, 56, 84, 3] uint8  random frames already at the target size (no resize)
    exact_pixels     [48, 1176] f32        pixel_values_videos (grid 2×4×6; 3 frames → pad to 4)
    resize_frames    [3, 50, 70, 3] uint8  random smooth frames that must be resized to 56×56
    resize_resized   [3, 56, 56, 3] uint8  torchvision's bicubic antialiased resize of them
    resize_pixels    [32, 1176] f32        pixel_values_videos (grid 2×4×4)
  qwen2vl_video.json
    processor settings of each case, video_grid_thw, smart_resize cases and sample_frames
    indices (uniform and fps) for several videos.

Both cases use min_pixels = 28·28 and max_pixels = 56·84 with the default patch 14, merge 2,
temporal patch 2 and OpenAI CLIP mean/std. reel reproduces both bit for bit: the resize case
follows torch's uint8 CPU kernel (int16 fixed-point weights, the path torchvision takes for uint8
bicubic antialiased resizes on x86 CPUs with AVX2, where this fixture was made).

Usage: /path/to/python scripts/make_video_fixture.py [OUT_DIR]   (torch, torchvision, transformers)
"""

import json
import os
import sys

import numpy as np
import torch
import torchvision.transforms.v2.functional as tvF
from safetensors.torch import save_file
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor, smart_resize
from transformers.video_utils import VideoMetadata

out = sys.argv[1] if len(sys.argv) > 1 else "fixtures/video"
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(0)

MIN_PIXELS, MAX_PIXELS = 28 * 28, 56 * 84


def processor():
    return Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def process(frames):
    p = processor()
    r = p(videos=[frames], return_tensors="pt", do_sample_frames=False, cap_pixels_per_frame=False)
    return r["pixel_values_videos"].float().contiguous(), r["video_grid_thw"][0].tolist()


exact = rng.integers(0, 256, size=(3, 56, 84, 3), dtype=np.uint8)
exact_pixels, exact_grid = process(exact)

# Smooth content (a gradient plus a little noise) so the resize is not dominated by clamping.
yy, xx = np.meshgrid(np.arange(50), np.arange(70), indexing="ij")
base = np.stack([yy * 4, xx * 3, (yy + xx) * 2], axis=-1)
resize = np.stack([base + 10 * t for t in range(3)]) + rng.integers(0, 40, size=(3, 50, 70, 3))
resize = np.clip(resize, 0, 255).astype(np.uint8)
resize_pixels, resize_grid = process(resize)
resized = tvF.resize(
    torch.from_numpy(resize).permute(0, 3, 1, 2).contiguous(),
    [56, 56],
    interpolation=tvF.InterpolationMode.BICUBIC,
    antialias=True,
)
resized = resized.permute(0, 2, 3, 1).contiguous()

save_file(
    {
        "exact_frames": torch.from_numpy(exact),
        "exact_pixels": exact_pixels,
        "resize_frames": torch.from_numpy(resize),
        "resize_resized": resized,
        "resize_pixels": resize_pixels,
    },
    os.path.join(out, "qwen2vl_video.safetensors"),
)

smart = []
for h, w, factor, lo, hi in [
    (224, 224, 28, 3136, 1003520),
    (50, 70, 28, 784, 4704),
    (480, 640, 28, 3136, 50176),
    (20, 30, 28, 12544, 1 << 30),
    (112, 112, 28, 128 * 28 * 28, 768 * 28 * 28),
    (1080, 1920, 28, 128 * 28 * 28, 768 * 28 * 28),
    (361, 203, 28, 3136, 200704),
    (98, 42, 28, 3136, 12845056),
]:
    smart.append({"in": [h, w, factor, lo, hi], "out": list(smart_resize(h, w, factor, lo, hi))})

p = processor()
sampling = []
for total, fps, num in [(10, 25.0, 4), (10, 25.0, 7), (100, 30.0, 16), (97, 29.97, 32), (3600, 1.0, 64),
                        (1001, 24.0, 10), (333, 30.0, 22), (77, 7.0, 6)]:
    md = VideoMetadata(total_num_frames=total, fps=fps)
    idx = p.sample_frames(md, num_frames=num).tolist()
    sampling.append({"total": total, "fps": fps, "uniform": num, "indices": idx})
for total, vfps, fps, lo, hi in [(100, 25.0, 2.0, 4, 768), (97, 29.97, 1.0, 4, 768),
                                 (3600, 30.0, 2.0, 4, 64), (1001, 24.0, 0.5, 4, 768), (9, 3.0, 10.0, 4, 768)]:
    md = VideoMetadata(total_num_frames=total, fps=vfps)
    idx = p.sample_frames(md, fps=fps, min_frames=lo, max_frames=hi).tolist()
    sampling.append({"total": total, "fps": vfps, "sample_fps": fps, "min_frames": lo, "max_frames": hi,
                     "indices": idx})

meta = {
    "min_pixels": MIN_PIXELS,
    "max_pixels": MAX_PIXELS,
    "exact_grid_thw": exact_grid,
    "resize_grid_thw": resize_grid,
    "smart_resize": smart,
    "sample_frames": sampling,
}
with open(os.path.join(out, "qwen2vl_video.json"), "w") as f:
    json.dump(meta, f)
print("wrote", out, "grids", exact_grid, resize_grid)
