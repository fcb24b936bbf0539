"""Full-size check of the loaders (issue 2 "done when"): writes a random-weight, full-size SD1.5
pipeline in diffusers layout and as an original-key single file, plus reference outputs from
diffusers/transformers, for the opt-in Rust test `tests/fullsize_optin.rs`:

    python scripts/fullsize_check.py --out /tmp/afa-fullsize      # ~8 GB on disk, a few minutes
    AFA_FULLSIZE_DIR=/tmp/afa-fullsize cargo test --release --test fullsize_optin -- --ignored --nocapture

Reference outputs (f32): token ids and text embeddings for [negative; prompt], the UNet's noise
prediction for a [2,4,32,32] latent with t = [981, 1], and a VAE decode of a [1,4,32,32] latent.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import single_file  # noqa: E402
import tiny_models  # noqa: E402

SD15_UNET = dict(cross_attention_dim=768, sample_size=64)
SD15_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)
SD15_CLIP = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/afa-fullsize"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    folder = args.out / "sd15-random"
    ref = args.out / "reference"
    ref.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)

    tiny_models.write_tokenizer(str(folder / "tokenizer"), 48894)
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    vae = AutoencoderKL(**SD15_VAE).eval()
    text = CLIPTextModel(CLIPTextConfig(**SD15_CLIP)).eval()
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    text.save_pretrained(folder / "text_encoder", safe_serialization=True)
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline",
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }))

    # single file with original SD key names
    load = single_file.load_weights
    sd = single_file.to_original(single_file.read_config(folder, "unet"), single_file.read_config(folder, "vae"),
                                 load(folder, "unet"), load(folder, "vae"), load(folder, "text_encoder"))
    single_file.add_extra_keys(sd, 77)
    save_file({k: v.contiguous() for k, v in sorted(sd.items())}, args.out / "sd15-random.safetensors",
              metadata={"format": "pt"})

    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    ids = tok(["blurry", "a photo of a cat"], padding="max_length", max_length=77, truncation=True,
              return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(2, 4, 32, 32, generator=g)
    z = torch.randn(1, 4, 32, 32, generator=g)
    with torch.no_grad():
        emb = text(ids)[0]
        eps = unet(latent, torch.tensor([981.0, 1.0]), encoder_hidden_states=emb).sample
        image = vae.decode(z).sample
    for name, t in [("ids", ids), ("text_emb", emb), ("unet_latent", latent), ("unet_eps", eps),
                    ("vae_z", z), ("vae_image", image)]:
        np.save(ref / f"{name}.npy", t.numpy())
    print("wrote", args.out)


if __name__ == "__main__":
    main()
