"""Schemathesis hooks of scripts/api_fuzz.sh (loaded through SCHEMATHESIS_HOOKS).

Keeps generation cheap without hiding any input from the server: just before a request is sent,
values that are *valid but expensive* (steps 2..=500, n 2..=16, sides 64..=2048 that are
multiples of 8, "WxH" sizes made of such sides) are mapped to small valid values of the same
kind (1-2 steps, 1-2 images, 64-120 px sides), and a JSON object or query without `steps` gets
`steps: 1` (the ensemble's default, 10, costs ~1.5 s an image here). Invalid values (0, 501, 17, 100, 4096, "big",
wrong types...) are sent exactly as generated, so every validation path is still exercised and
a valid case stays valid, an invalid one invalid.
"""
import re

import schemathesis

SIZE = re.compile(r"^([0-9]+)x([0-9]+)$")


def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _side(v):
    return 64 <= v <= 2048 and v % 8 == 0


def _small_side(v):
    return 64 + (v // 8 % 8) * 8


def _clamp(d, steps_as_text=False):
    if not isinstance(d, dict):
        return
    if "steps" not in d and "prompt" in d:
        d["steps"] = "1" if steps_as_text else 1
    for key, lo, hi, small in (("steps", 2, 500, lambda v: 1 + v % 2), ("n", 2, 16, lambda v: 1 + v % 2)):
        v = d.get(key)
        if _int(v) and lo <= v <= hi:
            d[key] = small(v)
        elif isinstance(v, str) and v.isdigit() and lo <= int(v) <= hi:
            d[key] = str(small(int(v)))
    for key in ("width", "height"):
        v = d.get(key)
        if _int(v) and _side(v):
            d[key] = _small_side(v)
        elif isinstance(v, str) and v.isdigit() and _side(int(v)):
            d[key] = str(_small_side(int(v)))
    size = d.get("size")
    if isinstance(size, str):
        m = SIZE.match(size)
        if m and _side(int(m[1])) and _side(int(m[2])):
            d["size"] = f"{_small_side(int(m[1]))}x{_small_side(int(m[2]))}"


@schemathesis.hook
def before_call(context, case, **kwargs):
    _clamp(case.body)
    _clamp(case.query, steps_as_text=True)
