"""Golden check of `reel eval` on a Qwen2.5-VL checkpoint and LongVideo-Reason records.

Writes fixtures/qwen2_5_vl-eval/:
  model/        a tiny random Qwen2_5_VLForConditionalGeneration folder as transformers saves it,
                with a character-level tokenizer holding Qwen2.5-VL's special tokens
                (<|vision_start|>, <|vision_end|>, <|video_pad|>, <|image_pad|>), its chat
                template, and video_preprocessor_config.json (56×56 frames are kept as they are)
  video/        one 4-frame video as a folder of PNG frames (reel reads folders at 1 frame/s, so
                second_per_grid_ts = temporal_patch_size / 1 = 2 s, a whole number as
                transformers 5.17 needs, see make_vl_fixtures.py)
  data.jsonl    two LongVideo-Reason records on that video
  eval.json     transformers' mean NLL over the target tokens and their count

The tokens are built as reel builds them (crates/data/src/vl_data.rs): the prompt is
`<|vision_start|><|video_pad|><|vision_end|>{problem}\n{instruction}`, its `<|video_pad|>` expanded
to t·h·w/4 copies, the assistant turn `<think>{reasoning}</think><answer>{X}</answer>`, rendered
with the chat template; a token is a target iff its start offset lies in the assistant span (the
rule of crates/data/src/sft.rs). Pixels come from transformers' Qwen2VLVideoProcessor.

Usage:  /work/pyenv/bin/python scripts/make_vl_eval_fixture.py [OUT_DIR]
CI never runs this script; its outputs are committed.
"""

import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLVideoProcessor,
)

sys.path.insert(0, os.path.dirname(__file__))
from make_fixtures import CHAT_TEMPLATE, SPECIALS  # noqa: E402
from make_vl_fixtures import init_weights  # noqa: E402

VISION = ["<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|image_pad|>"]
INSTRUCTION = (
    "Watch the whole video, think step by step inside <think> </think> tags, then give the "
    "letter of the correct option inside <answer> </answer> tags."
)
RECORDS = [
    {"problem_id": "eval-0", "problem": "Which colour appears first?\nA. red\nB. blue",
     "problem_type": "temporal", "reasoning": "The red square shows at 0 s.",
     "videos": ["video"], "answer": "<answer>A</answer>"},
    {"problem_id": "eval-1", "problem": "How many shapes?\nA. 1\nB. 2\nC. 3",
     "problem_type": "counting", "reasoning": "Two shapes move.",
     "videos": ["video"], "answer": "<answer>B</answer>"},
]


def tokenizer(out_dir):
    chars = [chr(c) for c in range(0x20, 0x7F)] + ["\n"]
    vocab = {ch: i for i, ch in enumerate(chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS + VISION)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def main(out):
    model_dir = os.path.join(out, "model")
    os.makedirs(model_dir, exist_ok=True)
    tok = tokenizer(model_dir)
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=112, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [2, 3, 3]},
            bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=48, num_heads=2, in_channels=3,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2,
            window_size=56, out_hidden_size=64, fullatt_block_indexes=[1],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(config).float()
    init_weights(model, 3)
    model.save_pretrained(model_dir, safe_serialization=True)
    proc_cfg = {
        "size": {"shortest_edge": 56 * 56, "longest_edge": 56 * 56},
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "rescale_factor": 1 / 255,
    }
    with open(os.path.join(model_dir, "video_preprocessor_config.json"), "w") as f:
        json.dump(proc_cfg, f, indent=2)

    # A 4-frame 56×56 video: a red square then a blue one moving over a grey gradient.
    vdir = os.path.join(out, "video")
    os.makedirs(vdir, exist_ok=True)
    frames = []
    for k in range(4):
        y, x = np.mgrid[0:56, 0:56]
        img = np.stack([(x * 4) % 256, (y * 4) % 256, ((x + y) * 2) % 256], -1).astype(np.uint8)
        img[8 + 6 * k:22 + 6 * k, 10:24] = [220, 40, 40]
        img[30:44, 5 + 8 * k:19 + 8 * k] = [40, 40, 220]
        Image.fromarray(img).save(os.path.join(vdir, f"frame_{k:03d}.png"))
        frames.append(img)
    vp = Qwen2VLVideoProcessor(
        size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56},
        patch_size=14, temporal_patch_size=2, merge_size=2,
    )
    vin = vp(videos=[np.stack(frames)], do_sample_frames=False, return_tensors="pt")
    pixels, grid = vin["pixel_values_videos"].float(), vin["video_grid_thw"]
    n_vid = int(grid.prod()) // 4
    seconds = torch.tensor([2.0])

    with open(os.path.join(out, "data.jsonl"), "w") as f:
        for r in RECORDS:
            f.write(json.dumps(r) + "\n")

    total, count = 0.0, 0
    for r in RECORDS:
        prompt = ("<|vision_start|><|video_pad|><|vision_end|>" + r["problem"].rstrip() + "\n"
                  + INSTRUCTION).replace("<|video_pad|>", "<|video_pad|>" * n_vid)
        answer = r["answer"][len("<answer>"):-len("</answer>")]
        target = f"<think>{r['reasoning'].strip()}</think><answer>{answer}</answer>"
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": target}]
        text = tok.apply_chat_template(msgs, tokenize=False)
        start = len(tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True))
        end = len(text)
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        input_ids = torch.tensor([enc["input_ids"]])
        assert int((input_ids == ids["<|video_pad|>"]).sum()) == n_vid
        mask = [start <= o[0] < end for o in enc["offset_mapping"]]
        mm = (input_ids == ids["<|video_pad|>"]).to(torch.int32) * 2
        with torch.no_grad():
            logits = model(input_ids=input_ids, pixel_values_videos=pixels, video_grid_thw=grid,
                           second_per_grid_ts=seconds, mm_token_type_ids=mm).logits
        logp = torch.log_softmax(logits[0].double(), dim=-1)
        for j in range(1, input_ids.shape[1]):
            if mask[j]:
                total -= logp[j - 1, input_ids[0, j]].item()
                count += 1
    result = {"mean_nll": total / count, "tokens": count, "video_tokens": n_vid,
              "video_grid_thw": grid[0].tolist()}
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fixtures/qwen2_5_vl-eval")
