"""Checks that a checkpoint folder written by reel loads in transformers and scores the same.

Usage (where torch + transformers are installed; reel's GPU host has both):
    python3 scripts/check_hf_compat.py MODEL_DIR DATA.jsonl REEL_EVAL.json
MODEL_DIR is a reel checkpoint (config.json, model.safetensors, tokenizer files); REEL_EVAL.json
is the output of `reel eval --json --model MODEL_DIR --data DATA.jsonl` computed by reel.
Loads the folder with AutoModelForCausalLM and PreTrainedTokenizerFast, computes the mean NLL of the assistant
tokens with the same rule as reel (scripts/make_fixtures.py: eval_nll) and compares.
"""

import json
import os
import sys

from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, os.path.dirname(__file__))
from make_fixtures import eval_nll  # noqa: E402


def main():
    model_dir, data, reel_eval = sys.argv[1:4]
    # tokenizer.json exactly as written: AutoTokenizer would map a qwen2 folder to Qwen2Tokenizer,
    # which rebuilds a byte-level Qwen tokenizer from the vocabulary (wrong for the demo's
    # character tokenizer; the same for real Qwen checkpoints).
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").float().eval()
    records = [json.loads(line) for line in open(data) if line.strip()]
    mean_nll, tokens = eval_nll(model, tok, records)
    reel = json.load(open(reel_eval))
    rel = abs(mean_nll - reel["mean_nll"]) / abs(mean_nll)
    ok = tokens == reel["tokens"] and rel < 1e-4
    print(json.dumps({"transformers_mean_nll": mean_nll, "transformers_tokens": tokens,
                      "reel_mean_nll": reel["mean_nll"], "reel_tokens": reel["tokens"],
                      "relative_difference": rel, "ok": ok}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
