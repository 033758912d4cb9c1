"""Golden fixtures from transformers for reel's Qwen2.5-VL (vision tower + merger + decoder).

Builds a tiny random `Qwen2_5_VLForConditionalGeneration` with transformers + PyTorch (fp32,
eager attention) and writes fixtures/qwen2_5_vl-tiny/:
  config.json, model.safetensors   the checkpoint folder exactly as transformers saves it
  golden.safetensors               inputs and outputs of one forward + backward:
    pixel_values_videos [P, C·T_p·p·p]  (f32; P patches of all videos, the processor's order)
    video_grid_thw [n, 3] (int32)       t, h, w in patches of each video
    second_per_grid_ts [n] (f32)        seconds per temporal patch of each video
    input_ids, labels [B, T] (int32)    placeholder runs of video_token_id with text around,
                                        labels -100 where ignored
    position_ids [3, B, T] (int32)      transformers' get_rope_index (t, h, w)
    video_embeds [P / merge², d_text]   the vision tower's output (merged, original order)
    logits [B, T, V], loss []
    grad.<param name>                   every parameter's gradient (names as saved)

The grids are non-square and the windows do not divide them evenly, so the window permutation
and its padding are exercised. second_per_grid_ts are whole seconds: transformers 5.17 truncates
them to integers before scaling (fixed upstream later), and reel scales before truncating, so the
two agree exactly on whole seconds.

Usage:  /work/pyenv/bin/python scripts/make_vl_fixtures.py [OUT_DIR]
(default fixtures/qwen2_5_vl-tiny). CI never runs this script; its outputs are committed.
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

VIDEO_TOKEN = 290
VISION_START = 288
VISION_END = 289
VOCAB = 300


def init_weights(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "norm" in name.split(".")[-2]:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=1,
            eos_token_id=2,
        ),
        vision_config=dict(
            depth=4,
            hidden_size=32,
            intermediate_size=48,
            num_heads=2,
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            tokens_per_second=2,
            # 56 px = 2 merged tokens a side: windows of 2×2 merged tokens (4×4 patches).
            window_size=56,
            out_hidden_size=64,
            fullatt_block_indexes=[1, 3],
        ),
        image_token_id=291,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(config).float()
    init_weights(model, 7)
    model.save_pretrained(out_dir, safe_serialization=True)

    vc = config.vision_config
    merge = vc.spatial_merge_size
    # Two videos: t=2 (4 frames), h=6, w=10 patches; t=1, h=4, w=6. Windows of 2×2 merged
    # tokens over 3×5 and 2×3 merged grids: padding on both axes.
    grids = [(2, 6, 10), (1, 4, 6)]
    seconds = [1.0, 2.0]
    g = torch.Generator().manual_seed(11)
    patch_len = vc.in_channels * vc.temporal_patch_size * vc.patch_size * vc.patch_size
    n_patches = sum(t * h * w for t, h, w in grids)
    pixel_values_videos = torch.randn(n_patches, patch_len, generator=g)

    # Two sequences: text, video 0, text, (second sequence) text, video 1, text.
    def video_run(grid):
        t, h, w = grid
        return [VISION_START] + [VIDEO_TOKEN] * (t * h * w // merge**2) + [VISION_END]

    def text(n):
        return torch.randint(3, 280, (n,), generator=g).tolist()

    seq0 = text(5) + video_run(grids[0]) + text(9)
    seq1 = text(3) + video_run(grids[1]) + text(6)
    t_len = max(len(seq0), len(seq1))
    # Right-pad the second row with extra text (no attention mask, so it is ordinary text).
    seq1 = seq1 + text(t_len - len(seq1))
    seq0 = seq0 + text(t_len - len(seq0))
    input_ids = torch.tensor([seq0, seq1])
    labels = input_ids.clone()
    labels[input_ids == VIDEO_TOKEN] = -100
    labels[0, :4] = -100
    labels[1, -3:] = -100
    mm_token_type_ids = (input_ids == VIDEO_TOKEN).to(torch.int32) * 2
    video_grid_thw = torch.tensor(grids)
    second_per_grid_ts = torch.tensor(seconds)

    position_ids, _ = model.model.get_rope_index(
        input_ids,
        mm_token_type_ids=mm_token_type_ids,
        video_grid_thw=video_grid_thw,
        second_per_grid_ts=second_per_grid_ts,
    )
    video_embeds = model.model.visual(pixel_values_videos, grid_thw=video_grid_thw).pooler_output

    model.zero_grad()
    out = model(
        input_ids=input_ids,
        labels=labels,
        pixel_values_videos=pixel_values_videos,
        video_grid_thw=video_grid_thw,
        second_per_grid_ts=second_per_grid_ts,
        mm_token_type_ids=mm_token_type_ids,
    )
    out.loss.backward()
    tensors = {
        "pixel_values_videos": pixel_values_videos.float().contiguous(),
        "video_grid_thw": video_grid_thw.to(torch.int32),
        "second_per_grid_ts": second_per_grid_ts.float(),
        "input_ids": input_ids.to(torch.int32),
        "labels": labels.to(torch.int32),
        "position_ids": position_ids.to(torch.int32).contiguous(),
        "video_embeds": video_embeds.detach().float().contiguous(),
        "logits": out.logits.detach().float().contiguous(),
        "loss": out.loss.detach().reshape(()).float(),
    }
    for name, p in model.named_parameters():
        tensors["grad." + name] = p.grad.detach().float().contiguous()
    save_file(tensors, os.path.join(out_dir, "golden.safetensors"))
    print(json.dumps({
        "out": out_dir,
        "T": t_len,
        "patches": n_patches,
        "loss": out.loss.item(),
        "params": sum(p.numel() for p in model.parameters()),
    }))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fixtures/qwen2_5_vl-tiny")
