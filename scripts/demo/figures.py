"""Figures of the demonstration ensemble for the README, made with the project's own CLI.

For fixed prompts and seeds, renders every mode (each member alone, the merge, the uniform mean,
AFA) with `afa generate`, and AFA's attention maps with `afa generate --maps`, then lays them out
as two PNGs with PIL:

  docs/demo/modes.png  rows = prompts, columns = modes (same seed per row)
  docs/demo/maps.png   the AFA image, then the heat maps of a few aggregation points (each pixel
                       mixes the members' colours by their weight: red = member 0, blue = member 1)

Run from the repository root after `cargo build --release`:
    /work/venv/bin/python scripts/demo/figures.py
"""
import json
import subprocess
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

AFA = "target/release/afa"
ENSEMBLE = "shapes-afa"
PROMPTS = [
    ("a red circle on the left", 3),
    ("a blue triangle on the top", 3),
    ("a green square in the center", 3),
    ("a yellow triangle on the bottom", 3),
    ("a blue circle on the right", 3),
]
MODES = ["single:circles-squares", "single:triangles-squares", "merge", "mean", "afa"]
LABELS = ["member A\n(circles+squares)", "member B\n(triangles+squares)", "merge", "mean", "AFA"]
CELL = 128
MAP_POINTS = [0, 4, 6, 9, 12]


def generate(prompt, seed, mode, out, maps=None):
    cmd = [AFA, "generate", "--config", "models.toml", "--ensemble", ENSEMBLE, "--mode", mode,
           "--prompt", prompt, "--seed", str(seed), "--quiet", "--out", str(out)]
    if maps:
        cmd += ["--maps", str(maps)]
    subprocess.run(cmd, check=True, capture_output=True)
    return Image.open(out).convert("RGB")


def label_strip(texts, width, height=34):
    strip = Image.new("RGB", (width * len(texts), height), "white")
    d = ImageDraw.Draw(strip)
    for i, t in enumerate(texts):
        d.multiline_text((i * width + 4, 2), t, fill="black", spacing=1)
    return strip


def main():
    Path("docs/demo").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp())
    rows = []
    for r, (prompt, seed) in enumerate(PROMPTS):
        cells = [generate(prompt, seed, m, tmp / f"{r}-{k}.png").resize((CELL, CELL), Image.NEAREST)
                 for k, m in enumerate(MODES)]
        row = Image.new("RGB", (CELL * len(MODES) + 230, CELL), "white")
        ImageDraw.Draw(row).text((4, CELL // 2 - 6), f"{prompt} (seed {seed})", fill="black")
        for k, c in enumerate(cells):
            row.paste(c, (230 + k * CELL, 0))
        rows.append(row)
    head = Image.new("RGB", (rows[0].width, 34), "white")
    head.paste(label_strip(LABELS, CELL), (230, 0))
    grid = Image.new("RGB", (rows[0].width, 34 + CELL * len(rows)), "white")
    grid.paste(head, (0, 0))
    for r, row in enumerate(rows):
        grid.paste(row, (0, 34 + r * CELL))
    grid.save("docs/demo/modes.png", optimize=True)

    prompt, seed = PROMPTS[1]
    maps = tmp / "maps"
    img = generate(prompt, seed, "afa", tmp / "maps.png", maps).resize((CELL, CELL), Image.NEAREST)
    tiles = [img] + [Image.open(maps / f"image0_point{k:02}.png").convert("RGB").resize((CELL, CELL), Image.NEAREST)
                     for k in MAP_POINTS]
    labels = [f"AFA: {prompt}"[:22]] + [f"point {k}" for k in MAP_POINTS]
    fig = Image.new("RGB", (CELL * len(tiles), CELL + 34), "white")
    fig.paste(label_strip(labels, CELL), (0, 0))
    for i, t in enumerate(tiles):
        fig.paste(t, (i * CELL, 34))
    fig.save("docs/demo/maps.png", optimize=True)
    print(json.dumps({"modes": "docs/demo/modes.png", "maps": "docs/demo/maps.png"}))


if __name__ == "__main__":
    main()
