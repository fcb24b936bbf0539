#!/usr/bin/env python3
"""PyTorch twin of `afa bench`: the same SD1.5 measurements with diffusers/transformers.

Full-size models are built from their configs with random init (no download), f32 on the CPU,
under torch.no_grad(), one warm-up run then `--repeats` timed runs (median reported). Prints a
markdown table in the same layout as `afa bench`.

    /work/pyenv/fx/bin/python scripts/bench_torch.py --threads 2 --repeats 3
"""
import argparse
import platform
import resource
import statistics
import time

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def time_runs(fn, repeats: int) -> list:
    with torch.no_grad():
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return sorted(times)


def row(name, shape, times, build_s):
    return {
        "name": name,
        "input": str(list(shape)),
        "median": statistics.median(times),
        "min": times[0],
        "max": times[-1],
        "runs": len(times),
        "build": build_s,
        "rss": peak_rss_mib(),
    }


def bench_unet(args, gen):
    from diffusers import UNet2DConditionModel

    reset_peak_rss()
    start = time.perf_counter()
    # diffusers' defaults are SD1.5's UNet; spelled out for clarity.
    unet = UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
    ).eval()
    build = time.perf_counter() - start
    rows = []
    b = args.unet_batch
    for size in args.unet_sizes:
        sample = torch.randn(b, 4, size, size, generator=gen)
        ctx = torch.randn(b, 77, 768, generator=gen)
        t = torch.full((b,), 500.0)
        times = time_runs(lambda: unet(sample, t, encoder_hidden_states=ctx).sample, args.repeats)
        rows.append(row("UNet forward", sample.shape, times, build))
    return rows


def bench_vae(args, gen):
    from diffusers import AutoencoderKL

    reset_peak_rss()
    start = time.perf_counter()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
    ).eval()
    build = time.perf_counter() - start
    s = args.vae_latent
    z = torch.randn(args.vae_batch, 4, s, s, generator=gen)
    times = time_runs(lambda: vae.decode(z).sample, args.repeats)
    return [row("VAE decode", z.shape, times, build)]


def bench_text(args, gen):
    from transformers import CLIPTextConfig, CLIPTextModel

    reset_peak_rss()
    start = time.perf_counter()
    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
    )
    model = CLIPTextModel(cfg).eval()
    build = time.perf_counter() - start
    ids = torch.randint(0, 49408, (args.text_batch, 77), generator=gen)
    times = time_runs(lambda: model(input_ids=ids).last_hidden_state, args.repeats)
    return [row("text encode", ids.shape, times, build)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="unet,vae,text", help="comma list of unet,vae,text")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--unet-sizes", default="32,64", help="latent sizes (pixels/8)")
    p.add_argument("--unet-batch", type=int, default=2)
    p.add_argument("--vae-latent", type=int, default=64)
    p.add_argument("--vae-batch", type=int, default=1)
    p.add_argument("--text-batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.unet_sizes = [int(s) for s in args.unet_sizes.split(",") if s]

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    import diffusers
    import transformers

    print(
        f"torch {torch.__version__} (diffusers {diffusers.__version__}, transformers "
        f"{transformers.__version__}) f32 CPU | {cpu_model()} | {torch.get_num_threads()} threads"
        f" | mkldnn {torch.backends.mkldnn.is_available()}\n"
    )
    benches = {"unet": bench_unet, "vae": bench_vae, "text": bench_text}
    rows = []
    for part in args.parts.split(","):
        rows += benches[part.strip()](args, gen)
    print("| part | input | median s | min s | max s | runs | build s | peak RSS MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['name']} | {r['input']} | {r['median']:.3f} | {r['min']:.3f} | {r['max']:.3f}"
            f" | {r['runs']} | {r['build']:.1f} | {r['rss']:.0f} |"
        )


if __name__ == "__main__":
    main()
