"""Full-size check of the AFA ensemble (issue 3 "done when"): an official-layout AFA folder with
N=2 full-size random SD1.5 members and the paper's aggregators (D=128, L=2, 8 heads, 32 groups;
random, conv_out std 0.1), plus the reference run of scripts/fixtures/afa_reference.py:
step-0 maps at all 25 points, the guided eps at step 0 and the final latent after 10 DDIM steps
at 256 px. Needs the member written by scripts/fullsize_check.py (expert 0); writes expert 1.

    python scripts/fullsize_check.py --out /tmp/afa-fullsize
    python scripts/fullsize_afa_check.py --root /tmp/afa-fullsize
    AFA_FULLSIZE_DIR=/tmp/afa-fullsize cargo test --release --test fullsize_optin -- --ignored --nocapture
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import afa_reference as R  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fullsize_check import SD15_CLIP, SD15_UNET  # noqa: E402


def link(src, dst):
    if not dst.exists():
        os.symlink(src, dst)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("/tmp/afa-fullsize"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    base = args.root / "sd15-random"
    out = args.root / "afa-n2"
    ref = args.root / "afa-n2-reference"
    out.mkdir(parents=True, exist_ok=True)
    for sub in ["unet", "text_encoder", "vae", "tokenizer", "scheduler", "model_index.json"]:
        link(base / sub, out / sub)
    torch.manual_seed(1)
    unet_b = UNet2DConditionModel(**SD15_UNET).eval()
    text_b = CLIPTextModel(CLIPTextConfig(**SD15_CLIP)).eval()
    unet_b.save_pretrained(out / "additional_unet_0", safe_serialization=True)
    text_b.save_pretrained(out / "additional_text_encoder_0", safe_serialization=True)

    unets = [UNet2DConditionModel.from_pretrained(base / "unet").eval(), unet_b]
    tes = [CLIPTextModel.from_pretrained(base / "text_encoder").eval(), text_b]
    for m in unets + tes:
        m.requires_grad_(False)
    aggs = R.make_aggregators(unets[0], 2, 768)
    for k, a in enumerate(aggs):
        R.randomize_aggregator(a, 5000 + k)
        R.save_tensors(a.state_dict(), str(out / f"aggregator_{k}" / "aggregator.safetensors"))
        R.write_json(str(out / f"aggregator_{k}" / "config.json"), a.config)
    R.write_json(str(out / "model_config.json"), {"num_models": 2, "num_aggregators": 25})

    tok = CLIPTokenizer.from_pretrained(base / "tokenizer")
    vae = AutoencoderKL.from_pretrained(base / "vae").eval()
    latents = R.seeded((1, 4, 32, 32), 7)
    with torch.no_grad():
        rec = R.afa_pipeline(unets, tes, aggs, tok, vae, R.PROMPT, R.NEGATIVE, latents)
    R.save_npy(str(ref), "latent_init", latents)
    for k, m in enumerate(rec["maps_step0"]):
        R.save_npy(str(ref), f"attention_maps_step0_{k}", m)
    R.save_npy(str(ref), "noise_pred_step0", rec["noise_pred_step0"])
    R.save_npy(str(ref), "latent_final", rec["latent_final"])
    (ref / "prompt.json").write_text(json.dumps({"prompt": R.PROMPT, "negative": R.NEGATIVE, "steps": R.STEPS,
                                                 "guidance": R.GUIDANCE, "size": 256}))
    print("wrote", out, "and", ref)


if __name__ == "__main__":
    main()
