#!/usr/bin/env python3
"""Drives a running `afa serve` with the official `openai` Python client, unchanged.

Usage: python tests/openai_conformance.py http://127.0.0.1:PORT
Checks: images.generate with b64_json and our extensions via extra_body (a valid PNG with the
A1111 `parameters` chunk, reproducible by seed), models.list/retrieve, error mapping
(BadRequestError for bad input, NotFoundError for an unknown model), and x-request-id.
Exits non-zero on the first failure.
"""
import base64
import urllib.request
import struct
import sys
import zlib

import openai
from openai import OpenAI


def png_text_chunks(data: bytes) -> dict:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    chunks, pos = {}, 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        if kind == b"IHDR":
            chunks["size"] = struct.unpack(">II", body[:8])
        elif kind == b"tEXt":
            key, _, text = body.partition(b"\0")
            chunks[key.decode("latin-1")] = text.decode("latin-1")
        elif kind == b"iTXt":
            key, _, rest = body.partition(b"\0")
            flag, _method = rest[0], rest[1]
            _lang, _, rest = rest[2:].partition(b"\0")
            _tkey, _, text = rest.partition(b"\0")
            chunks[key.decode("latin-1")] = (zlib.decompress(text) if flag else text).decode("utf-8")
        pos += 12 + length
    return chunks


def make_png(width: int, height: int, pixel) -> bytes:
    """An 8-bit RGBA PNG whose pixel (x, y) is pixel(x, y) -> (r, g, b, a)."""
    rows = b"".join(b"\0" + b"".join(bytes(pixel(x, y)) for x in range(width)) for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def check_edits(client: OpenAI) -> None:
    """images.edit as an application calls it: a picture, then with a mask (transparent where it
    is edited), our extensions through extra_body, and refusals by name."""
    picture = make_png(96, 64, lambda x, y: (2 * x, 3 * y, 128, 255))
    mask = make_png(96, 64, lambda x, y: (0, 0, 0, 0 if x < 48 else 255))
    edited = client.images.edit(model="tiny-afa", image=("picture.png", picture, "image/png"),
                                prompt="a red boat", n=2, size="64x64",
                                extra_body={"seed": 8, "steps": 2, "strength": 0.6})
    assert len(edited.data) == 2
    for item in edited.data:
        assert png_text_chunks(base64.b64decode(item.b64_json))["size"] == (64, 64)
    inpainted = client.images.edit(model="tiny-afa", image=("picture.png", picture, "image/png"),
                                   mask=("mask.png", mask, "image/png"), prompt="a red boat",
                                   extra_body={"seed": 8, "steps": 2,
                                               "return_attention_maps": {"steps": "mean"}})
    png = base64.b64decode(inpainted.data[0].b64_json)
    assert png_text_chunks(png)["size"] == (96, 64), "the picture's own size"
    for kwargs, field in ((dict(mask=("mask.png", make_png(8, 8, lambda x, y: (0, 0, 0, 0)),
                                      "image/png")), "mask"),
                          (dict(image=("picture.png", b"not a picture", "image/png")), "image")):
        args = dict(model="tiny-afa", image=("picture.png", picture, "image/png"), prompt="a")
        args.update(kwargs)
        try:
            client.images.edit(**args)
        except openai.BadRequestError as e:
            err = e.body.get("error", e.body) if isinstance(e.body, dict) else {}
            assert err.get("param") == field, (field, e.body)
        else:
            raise AssertionError(f"no BadRequestError for a bad {field}")


def main() -> None:
    base = sys.argv[1].rstrip("/")
    client = OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    extra = {"seed": 1, "steps": 2, "guidance_scale": 5.0, "negative_prompt": "blurry",
             "scheduler": "ddim", "ensemble_mode": "afa"}

    raw = client.images.with_raw_response.generate(
        model="tiny-afa", prompt="a lighthouse", response_format="b64_json", size="128x128",
        extra_body=extra, extra_headers={"x-request-id": "conformance-1"})
    assert raw.headers.get("x-request-id") == "conformance-1", raw.headers
    result = raw.parse()
    assert result.created > 0 and len(result.data) == 1
    png = base64.b64decode(result.data[0].b64_json)
    info = png_text_chunks(png)
    assert info["size"] == (128, 128), info["size"]
    params = info.get("parameters", "")
    assert params.startswith("a lighthouse"), params
    for needle in ("Negative prompt: blurry", "Steps: 2", "Seed: 1", "CFG scale: 5"):
        assert needle in params, (needle, params)

    again = client.images.generate(model="tiny-afa", prompt="a lighthouse",
                                   response_format="b64_json", size="128x128", extra_body=extra)
    assert base64.b64decode(again.data[0].b64_json) == png, "same seed, different image"

    two = client.images.generate(model="tiny-afa", prompt="a lighthouse", n=2,
                                 extra_body={"seed": 10, "steps": 1})
    assert len(two.data) == 2

    # response_format="url": the job store keeps the PNG and the response links to it.
    linked = client.images.generate(model="tiny-afa", prompt="a lighthouse", response_format="url",
                                    extra_body={"seed": 3, "steps": 1})
    url = linked.data[0].url
    assert url and url.startswith("http"), url
    with urllib.request.urlopen(url, timeout=60) as r:
        assert r.read().startswith(b"\x89PNG"), "the url does not serve a PNG"

    # Official fields the client sends: honoured or accepted with a documented meaning...
    official = client.images.generate(
        model="tiny-afa", prompt="a lighthouse", background="opaque", moderation="low",
        output_format="png", output_compression=100, quality="auto", safety_identifier="user-1",
        user="user-1", extra_body={"seed": 4, "steps": 1})
    assert base64.b64decode(official.data[0].b64_json).startswith(b"\x89PNG")
    # output_format: a JPEG (quality = output_compression) or a lossless WebP, each with the
    # A1111 parameters in an EXIF UserComment (UTF-16BE after "UNICODE\0", as A1111 writes it).
    for fmt, magic in (("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")):
        r = client.images.generate(model="tiny-afa", prompt="a lighthouse", output_format=fmt,
                                   output_compression=80, extra_body={"seed": 6, "steps": 1})
        data = base64.b64decode(r.data[0].b64_json)
        assert data.startswith(magic), (fmt, data[:12])
        assert b"UNICODE\x00" + "a lighthouse".encode("utf-16-be") in data, (fmt, "no EXIF")
        assert "Seed: 6".encode("utf-16-be") in data, (fmt, "no parameters in EXIF")
    assert client.images.generate(model="tiny-afa", prompt="a", output_format="jpeg",
                                  extra_body={"seed": 6, "steps": 1}).output_format == "jpeg"
    # stream=True with partial_images=2: two previews, then the completed image.
    events = list(client.images.generate(model="tiny-afa", prompt="a lighthouse", stream=True,
                                         partial_images=2, size="128x128",
                                         extra_body={"seed": 7, "steps": 4}))
    kinds = [e.type for e in events if e.type != "image_generation.progress"]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], kinds
    partials = [e for e in events if e.type == "image_generation.partial_image"]
    assert [p.partial_image_index for p in partials] == [0, 1], partials
    for p in partials:
        assert (p.size, p.output_format, p.background) == ("128x128", "png", "opaque"), p
        assert png_text_chunks(base64.b64decode(p.b64_json))["size"] == (128, 128)
    completed = events[-1]
    final = base64.b64decode(completed.b64_json)
    plain = client.images.generate(model="tiny-afa", prompt="a lighthouse", size="128x128",
                                   extra_body={"seed": 7, "steps": 4})
    assert base64.b64decode(plain.data[0].b64_json) == final, "previews changed the image"
    # quality without steps stands for a step count: low half the default, high twice it.
    def steps_of(**kwargs) -> int:
        r = client.images.generate(model="tiny-afa", prompt="a lighthouse", size="64x64",
                                   extra_body={"seed": 5}, **kwargs)
        params = png_text_chunks(base64.b64decode(r.data[0].b64_json))["parameters"]
        return int(params.split("Steps: ")[1].split(",")[0])
    default = steps_of()
    assert steps_of(quality="low") == max(1, default // 2), default
    assert steps_of(quality="high") == 2 * default, default
    # ... or refused by name, with the reason.
    for kwargs, field in ((dict(background="transparent"), "background"),
                          (dict(moderation="strict"), "moderation"),
                          (dict(output_compression=101), "output_compression"),
                          (dict(output_format="gif"), "output_format"),
                          (dict(partial_images=2), "partial_images"),
                          (dict(partial_images=4, stream=True), "partial_images")):
        try:
            client.images.generate(model="tiny-afa", prompt="a", **kwargs)
        except openai.BadRequestError as e:
            err = e.body.get("error", e.body) if isinstance(e.body, dict) else {}
            assert err.get("param") == field, (kwargs, e.body)
        else:
            raise AssertionError(f"no BadRequestError for {kwargs}")

    models = client.models.list()
    ids = [m.id for m in models.data]
    assert "tiny-afa" in ids, ids
    assert client.models.retrieve("tiny-afa").id == "tiny-afa"

    bad_cases = [
        dict(prompt="", model="tiny-afa"),
        dict(prompt="a", model="tiny-afa", size="13x13"),
        dict(prompt="a", model="tiny-afa", extra_body={"steps": 0}),
        dict(prompt="a", model="tiny-afa", extra_body={"guidance_scale": -1}),
        dict(prompt="a", model="tiny-afa", extra_body={"scheduler": "plms"}),
        dict(prompt="a", model="tiny-afa", extra_body={"colour": "red"}),
    ]
    for kwargs in bad_cases:
        try:
            client.images.generate(**kwargs)
        except openai.BadRequestError as e:
            body = e.body if isinstance(e.body, dict) else {}
            err = body.get("error", body)
            assert err.get("param") or err.get("message"), e.body
            assert e.response.headers.get("x-request-id"), "no x-request-id on an error"
        else:
            raise AssertionError(f"no BadRequestError for {kwargs}")

    for call in (lambda: client.images.generate(model="dall-e-3", prompt="a"),
                 lambda: client.models.retrieve("dall-e-3")):
        try:
            call()
        except openai.NotFoundError as e:
            assert e.response.headers.get("x-request-id")
        else:
            raise AssertionError("no NotFoundError for an unknown model")

    check_edits(client)

    print("openai conformance: ok (openai", openai.__version__ + ")")


if __name__ == "__main__":
    main()
