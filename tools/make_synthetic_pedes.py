"""Render a synthetic SYNTH-PEDES-format person dataset with PIL drawing (no downloads, deterministic per seed).

    python3 tools/make_synthetic_pedes.py --out data/synth --ids 1000 --images_per_id 4 --seed 0
    python3 tools/make_synthetic_pedes.py --out /tmp/tiny --ids 12 --images_per_id 3 --height 128 --width 64 --no_zh

Writes DIR/Part1/<id>/<k>.jpg and DIR/synthpedes-dataset.json, a list of records
{"id", "file_path", "attributes": "gender,hair,upper,lower,shoes,carried", "captions": [2-3 English],
 "captions_zh": [their Chinese translations], "prompt_caption": [templated caption]} and no "split"
(like the real SYNTH-PEDES; data.py holds out identities itself).
An identity is its six attributes plus personal traits that captions do not mention (height, build, skin tone,
exact shade); its images differ in pose, facing, scale, position, background, lighting, blur and JPEG quality.
Every identity and every image has its own RNG seeded by (seed, id[, k]), so the output of id i does not depend
on --ids or --workers, and the same arguments give byte-identical files.
"""
import argparse
import io
import json
import math
import os
import random
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import captions  # noqa: E402
from cli import fail  # noqa: E402

JSON_NAME = "synthpedes-dataset.json"
# Garment palette: the colours captions name. Spaced apart so that "red" stays red under the lighting changes.
PALETTE = {"black": (28, 28, 30), "white": (236, 236, 232), "gray": (128, 128, 128), "red": (200, 30, 35),
           "blue": (35, 70, 185), "green": (40, 135, 60), "yellow": (235, 200, 40), "orange": (240, 130, 25),
           "pink": (240, 145, 185), "purple": (115, 50, 150), "brown": (115, 72, 38), "khaki": (190, 170, 120)}
HAIR_RGB = {"black": (22, 20, 20), "brown": (100, 60, 30), "blonde": (215, 185, 105), "gray": (150, 150, 150)}
SKIN = [(250, 220, 195), (235, 195, 160), (210, 160, 120), (170, 120, 80), (120, 80, 55), (90, 60, 40)]

# (value, weight) tables: popular values repeat across identities, as in real street data.
UPPER_COLOURS = [("black", 20), ("white", 16), ("gray", 10), ("blue", 10), ("red", 8), ("green", 6), ("yellow", 5),
                 ("orange", 4), ("pink", 6), ("purple", 4), ("brown", 6)]
UPPER = {"man": [("t-shirt", 30), ("shirt", 20), ("jacket", 20), ("coat", 12), ("sweater", 10), ("vest", 8)],
         "woman": [("t-shirt", 22), ("shirt", 15), ("jacket", 15), ("coat", 15), ("sweater", 10), ("vest", 5),
                   ("dress", 18)]}
LOWER = {"man": [("trousers", 40), ("jeans", 40), ("shorts", 20)],
         "woman": [("trousers", 30), ("jeans", 30), ("shorts", 15), ("skirt", 25)]}
LOWER_COLOURS = {"jeans": [("blue", 60), ("black", 25), ("gray", 10), ("white", 5)],
                 "trousers": [("black", 35), ("gray", 15), ("khaki", 15), ("brown", 10), ("blue", 10), ("white", 5),
                              ("green", 5), ("red", 2), ("purple", 3)]}
ANY_COLOURS = UPPER_COLOURS + [("khaki", 6)]
SHOES = [("shoes", 45), ("sneakers", 35), ("boots", 20)]
SHOE_COLOURS = [("black", 45), ("white", 25), ("brown", 12), ("gray", 8), ("red", 4), ("blue", 3), ("pink", 3)]
CARRIED = {"man": [(None, 50), ("backpack", 30), ("handbag", 8), ("umbrella", 12)],
           "woman": [(None, 40), ("backpack", 20), ("handbag", 30), ("umbrella", 10)]}
CARRIED_COLOURS = [("black", 40), ("brown", 12), ("red", 10), ("blue", 10), ("gray", 8), ("pink", 6), ("green", 5),
                   ("yellow", 4), ("purple", 3), ("white", 2)]
HAIR = {"man": [("short", 75), ("bald", 8), ("long", 10), ("ponytail", 7)],
        "woman": [("long", 50), ("ponytail", 25), ("short", 25)]}
HAIR_COLOURS = [("black", 55), ("brown", 25), ("blonde", 12), ("gray", 8)]


def _choice(rng, table):
    return rng.choices([v for v, _ in table], weights=[w for _, w in table])[0]


def _jitter(rng, rgb, amount=12):
    # mostly a lightness shift: independent channel noise would tint grays and whites
    common = rng.randint(-amount, amount)
    return tuple(max(0, min(255, c + common + rng.randint(-amount // 3, amount // 3))) for c in rgb)


def make_identity(seed, pid):
    """Attributes + personal traits of identity pid; depends only on (seed, pid)."""
    rng = random.Random(f"synth-pedes/{seed}/{pid}")
    g = rng.choice(["man", "woman"])
    hair = _choice(rng, HAIR[g])
    hair_col = _choice(rng, HAIR_COLOURS)
    upper = _choice(rng, UPPER[g])
    upper_col = _choice(rng, UPPER_COLOURS + ([("pink", 6)] if g == "woman" else []))
    striped = upper in ("t-shirt", "shirt", "sweater") and rng.random() < 0.15
    lower = None if upper == "dress" else _choice(rng, LOWER[g])
    lower_col = lower and _choice(rng, LOWER_COLOURS.get(lower, ANY_COLOURS))
    if lower_col == upper_col and lower != "jeans" and rng.random() < 0.7:  # full one-colour outfits are rare
        lower_col = _choice(rng, ANY_COLOURS)
    shoes, shoes_col = _choice(rng, SHOES), _choice(rng, SHOE_COLOURS)
    carried = _choice(rng, CARRIED[g])
    carried_col = carried and _choice(rng, CARRIED_COLOURS)
    # the attribute text sometimes leaves the hair length out, as real annotations do
    hair_txt = ("bald" if hair == "bald" else f"{hair_col} ponytail" if hair == "ponytail"
                else f"{hair_col} hair" if rng.random() < 0.2 else f"{hair} {hair_col} hair")
    fields = [g, hair_txt, f"{upper_col} {'striped ' if striped else ''}{upper}",
              f"{lower_col} {lower}" if lower else "unknown", f"{shoes_col} {shoes}",
              f"{carried_col} {carried}" if carried else "unknown"]
    return {"pid": pid, "gender": g, "hair": hair, "hair_rgb": _jitter(rng, HAIR_RGB[hair_col], 8),
            "upper": upper, "upper_colour": upper_col, "upper_rgb": _jitter(rng, PALETTE[upper_col]),
            "striped": striped, "lower": lower, "lower_rgb": lower and _jitter(rng, PALETTE[lower_col]),
            "shoes": shoes, "shoes_rgb": _jitter(rng, PALETTE[shoes_col], 8), "carried": carried,
            "carried_rgb": carried and _jitter(rng, PALETTE[carried_col]), "skin": _jitter(rng, rng.choice(SKIN), 8),
            "height": rng.uniform(0.9, 1.0), "build": rng.uniform(0.85, 1.15) * (0.93 if g == "woman" else 1.0),
            "attributes": ",".join(fields)}


def _muted(rng):
    g = rng.uniform(60, 200)
    return np.array([g + rng.uniform(-25, 25) for _ in range(3)], dtype=np.float32)


def _background(rng, nrng, w, h):
    """Colour gradient, textured flat colour, or a crude street scene; muted so garments stay the salient colours."""
    kind = rng.randrange(3)
    c0, c1 = _muted(rng), _muted(rng)
    if kind == 0:
        vertical = rng.random() < 0.7
        t = np.linspace(0, 1, h if vertical else w, dtype=np.float32)
        t = t[:, None, None] if vertical else t[None, :, None]
        arr = np.broadcast_to(c0 * (1 - t) + c1 * t, (h, w, 3))
    elif kind == 1:
        arr = c0 + nrng.standard_normal((h, w, 1), dtype=np.float32) * rng.uniform(6, 20)
    else:
        arr = np.empty((h, w, 3), dtype=np.float32)
        horizon = int(h * rng.uniform(0.55, 0.8))
        arr[:horizon], arr[horizon:] = c0, c1 * 0.8
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if kind == 2:
        d = ImageDraw.Draw(img)
        for _ in range(rng.randrange(2, 7)):  # windows, doors, poles, parked things
            x, y = rng.uniform(-0.1, 1) * w, rng.uniform(0, 0.8) * h
            d.rectangle([x, y, x + rng.uniform(0.05, 0.4) * w, y + rng.uniform(0.05, 0.3) * h],
                        fill=tuple(int(c) for c in _muted(rng)))
    return img


def _shade(rgb, f):
    return tuple(max(0, min(255, int(c * f))) for c in rgb)


def _limb(d, p0, p1, width, fill):
    d.line([p0, p1], fill=fill, width=max(1, int(width)))
    r = width / 2
    for x, y in (p0, p1):
        d.ellipse([x - r, y - r, x + r, y + r], fill=fill)


def _draw_person(d, ident, rng, cx, top, u):
    """Draw the figure (u = person height in px) and return the box of torso pixels that show the upper garment."""
    b, skin = ident["build"], ident["skin"]
    facing = _choice(rng, [("front", 45), ("back", 30), ("left", 12), ("right", 13)])
    side = facing in ("left", "right")
    dirx = {"left": -1, "right": 1}.get(facing, 0)
    head_r = 0.062 * u
    head_c = (cx + dirx * 0.01 * u, top + head_r)
    sh_y, waist_y, hip_y, ankle_y = top + 0.155 * u, top + 0.46 * u, top + 0.53 * u, top + 0.955 * u
    sw = (0.065 if side else 0.115) * u * b  # shoulder half-width
    ww = (0.06 if side else 0.095) * u * b * (0.92 if ident["gender"] == "woman" else 1.0)
    lw, aw = 0.07 * u * b, 0.052 * u * b
    upper, lower, up_rgb, lo_rgb = ident["upper"], ident["lower"], ident["upper_rgb"], ident["lower_rgb"]
    carried, c_rgb = ident["carried"], ident["carried_rgb"]
    umbrella_open = carried == "umbrella" and rng.random() < 0.5

    # legs and arms: hip/shoulder anchors and end points by pose
    stride = math.radians(rng.uniform(8, 25) if side else rng.uniform(1, 6))
    hips = [(cx - (0.01 if side else 0.045) * u * b, hip_y), (cx + (0.01 if side else 0.045) * u * b, hip_y)]
    leg_len = ankle_y - hip_y
    legs = []
    for i, (hx, hy) in enumerate(hips):
        a = stride * (1 if i else -1) * (1 if side else rng.uniform(0.5, 1.2))
        legs.append(((hx, hy), (hx + math.sin(a) * leg_len, hy + math.cos(a) * leg_len)))
    arm_len = 0.37 * u
    arms = []
    for i, s in enumerate((-1, 1)):
        sx = cx + (0 if side else s * (sw - aw * 0.4))
        if side:
            a = math.radians(rng.uniform(-25, 25)) * (1 if i else -1)
        else:
            a = s * math.radians(rng.uniform(4, 14))
        arms.append(((sx, sh_y + 0.02 * u), (sx + math.sin(a) * arm_len, sh_y + 0.02 * u + math.cos(a) * arm_len)))
    if umbrella_open:  # raise the umbrella hand beside the head
        (sx, sy), _ = arms[1]
        arms[1] = ((sx, sy), (sx + 0.06 * u, sh_y - 0.08 * u))
    sleeve = {"t-shirt": 0.4, "dress": 0.3, "vest": 0.0}.get(upper, 1.0)

    def draw_arm(arm):
        (x0, y0), (x1, y1) = arm
        _limb(d, (x0, y0), (x1, y1), aw, skin)
        if sleeve:
            _limb(d, (x0, y0), (x0 + (x1 - x0) * sleeve, y0 + (y1 - y0) * sleeve), aw * 1.15, up_rgb)
        d.ellipse([x1 - aw * 0.6, y1 - aw * 0.6, x1 + aw * 0.6, y1 + aw * 0.6], fill=skin)

    # behind the body: long hair, a backpack seen from the front/side, the far arm in side view
    hair_rgb = ident["hair_rgb"]
    if ident["hair"] == "long" and not side:
        d.rectangle([head_c[0] - head_r * 1.1, head_c[1], head_c[0] + head_r * 1.1, sh_y + 0.09 * u], fill=hair_rgb)
    if carried == "backpack" and facing != "back":
        bx = cx - dirx * (ww + 0.05 * u) if side else cx
        bwid = 0.07 * u if side else sw * 1.1
        d.rounded_rectangle([bx - bwid, sh_y + 0.02 * u, bx + bwid, waist_y - 0.02 * u], radius=0.03 * u, fill=c_rgb)
    if side:
        draw_arm(arms[0])

    # legs: skin, then the lower garment over them; shoes at the ankles
    for p0, p1 in legs:
        _limb(d, p0, p1, lw, skin)
    cover = {"trousers": 1.0, "jeans": 1.0, "shorts": 0.38}.get(lower, 0.0)
    for p0, p1 in legs:
        if cover:
            end = (p0[0] + (p1[0] - p0[0]) * cover, p0[1] + (p1[1] - p0[1]) * cover)
            _limb(d, p0, end, lw * 1.12, lo_rgb)
            if lower == "jeans":  # lighter seam
                d.line([p0, end], fill=_shade(lo_rgb, 1.35), width=max(1, int(0.008 * u)))
    for _, (ax, ay) in legs:
        fx = ax + dirx * 0.03 * u
        s_rgb = ident["shoes_rgb"]
        if ident["shoes"] == "boots":
            _limb(d, (ax, ay - 0.08 * u), (ax, ay), lw * 1.2, s_rgb)
        d.ellipse([fx - 0.048 * u, ay - 0.025 * u, fx + 0.048 * u, ay + 0.045 * u], fill=s_rgb)
        if ident["shoes"] == "sneakers":  # contrasting sole
            sole = (235, 235, 235) if sum(s_rgb) < 600 else (90, 90, 90)
            d.rectangle([fx - 0.046 * u, ay + 0.028 * u, fx + 0.046 * u, ay + 0.042 * u], fill=sole)

    # hips belong to the lower garment (or the skirt/dress flares over them)
    if lower in ("trousers", "jeans", "shorts"):
        d.polygon([(cx - ww, waist_y - 0.01 * u), (cx + ww, waist_y - 0.01 * u),
                   (cx + ww * 1.05, hip_y + 0.03 * u), (cx - ww * 1.05, hip_y + 0.03 * u)], fill=lo_rgb)
    if lower == "skirt":
        d.polygon([(cx - ww, waist_y - 0.01 * u), (cx + ww, waist_y - 0.01 * u),
                   (cx + ww * 1.6, top + 0.72 * u), (cx - ww * 1.6, top + 0.72 * u)], fill=lo_rgb)

    # torso: the upper garment by type
    hem = {"coat": 0.66, "dress": 0.74, "jacket": 0.5, "sweater": 0.49}.get(upper, 0.47)
    hem_y = top + hem * u
    flare = {"coat": 1.25, "dress": 1.7}.get(upper, 1.0)
    sh = sw * (0.85 if upper == "vest" else 1.0)
    d.polygon([(cx - sh, sh_y), (cx + sh, sh_y), (cx + ww, waist_y), (cx + ww * flare, hem_y),
               (cx - ww * flare, hem_y), (cx - ww, waist_y)], fill=up_rgb)
    for s in (-1, 1):  # rounded shoulders
        d.ellipse([cx + s * sh - aw * 0.6, sh_y - aw * 0.2, cx + s * sh + aw * 0.6, sh_y + aw], fill=up_rgb)
    if ident["striped"]:
        stripe = (80, 80, 80) if sum(up_rgb) < 150 else _shade(up_rgb, 0.6)
        y = sh_y + 0.05 * u
        while y < hem_y - 0.01 * u:
            d.line([(cx - ww * 1.1, y), (cx + ww * 1.1, y)], fill=stripe, width=max(1, int(0.012 * u)))
            y += 0.045 * u
    dark = _shade(up_rgb, 0.6) if sum(up_rgb) > 150 else (75, 75, 75)
    if upper in ("jacket", "coat") and facing == "front":  # zip / button line
        d.line([(cx, sh_y + 0.03 * u), (cx, hem_y)], fill=dark, width=max(1, int(0.01 * u)))
    if upper == "sweater":
        d.rectangle([cx - ww, hem_y - 0.025 * u, cx + ww, hem_y], fill=dark)

    # neck opening, neck and head
    neck_w = 0.03 * u
    d.rectangle([head_c[0] - neck_w, head_c[1] + head_r * 0.7, head_c[0] + neck_w, sh_y + 0.01 * u], fill=skin)
    if facing == "front":
        if upper == "vest":
            d.polygon([(cx - 0.04 * u, sh_y), (cx + 0.04 * u, sh_y), (cx, sh_y + 0.08 * u)], fill=skin)
        elif upper == "shirt":  # collar
            d.polygon([(cx - 0.045 * u, sh_y - 0.005 * u), (cx, sh_y + 0.04 * u), (cx - 0.01 * u, sh_y + 0.045 * u),
                       (cx - 0.05 * u, sh_y + 0.02 * u)], fill=dark)
            d.polygon([(cx + 0.045 * u, sh_y - 0.005 * u), (cx, sh_y + 0.04 * u), (cx + 0.01 * u, sh_y + 0.045 * u),
                       (cx + 0.05 * u, sh_y + 0.02 * u)], fill=dark)
        else:
            d.pieslice([cx - 0.035 * u, sh_y - 0.03 * u, cx + 0.035 * u, sh_y + 0.03 * u], 0, 180, fill=skin)
    hx, hy = head_c
    d.ellipse([hx - head_r * 0.88, hy - head_r, hx + head_r * 0.88, hy + head_r], fill=skin)

    # hair
    hair = ident["hair"]
    if hair != "bald":
        back = facing == "back"
        d.chord([hx - head_r * 0.95, hy - head_r * 1.08, hx + head_r * 0.95, hy + head_r * (1.0 if back else 0.5)],
                180, 360, fill=hair_rgb)
        if back:  # the whole back of the head is hair
            d.ellipse([hx - head_r * 0.9, hy - head_r, hx + head_r * 0.9, hy + head_r * 0.9], fill=hair_rgb)
        if hair == "long":
            if side:
                d.rectangle([hx - dirx * head_r * 0.9 - head_r * 0.45, hy - head_r * 0.4,
                             hx - dirx * head_r * 0.9 + head_r * 0.45, sh_y + 0.08 * u], fill=hair_rgb)
            elif back:
                d.rectangle([hx - head_r * 0.95, hy, hx + head_r * 0.95, sh_y + 0.09 * u], fill=hair_rgb)
            else:  # strands framing the face
                for s in (-1, 1):
                    d.rectangle([hx + s * head_r * 0.95 - head_r * 0.22, hy - head_r * 0.3,
                                 hx + s * head_r * 0.95 + head_r * 0.22, sh_y + 0.05 * u], fill=hair_rgb)
        if hair == "ponytail":
            tx = hx - dirx * head_r * 1.05 if side else hx
            ty = hy + (head_r * 0.3 if side or back else -head_r * 0.2)
            if facing == "front":  # tail peeks out from behind one side
                tx = hx + head_r * 0.95
            d.ellipse([tx - head_r * 0.35, ty - head_r * 0.2, tx + head_r * 0.35, ty + head_r * 1.5], fill=hair_rgb)
    if facing != "back":  # eyes: a tiny cue for facing
        eye = (40, 30, 30)
        ex = [hx - head_r * 0.35, hx + head_r * 0.35] if not side else [hx + dirx * head_r * 0.5]
        for x in ex:
            d.ellipse([x - head_r * 0.1, hy - head_r * 0.05, x + head_r * 0.1, hy + head_r * 0.15], fill=eye)

    # backpack from behind, straps in front
    box = [cx - ww * 0.5, sh_y + 0.1 * u, cx + ww * 0.5, waist_y - 0.02 * u]
    if carried == "backpack" and facing == "back":
        d.rounded_rectangle([cx - sw * 0.8, sh_y + 0.02 * u, cx + sw * 0.8, waist_y - 0.1 * u], radius=0.03 * u,
                            fill=c_rgb)
        box = [cx - ww * 0.6, waist_y - 0.085 * u, cx + ww * 0.6, waist_y - 0.015 * u]
    elif carried == "backpack" and facing == "front":
        for s in (-1, 1):
            d.line([(cx + s * sw * 0.6, sh_y), (cx + s * ww * 0.75, waist_y - 0.05 * u)], fill=c_rgb,
                   width=max(1, int(0.022 * u)))

    # arms in front of the body, then what the hands hold
    for arm in (arms[1:] if side else arms):
        draw_arm(arm)
    hand = arms[1][1]
    if carried == "handbag":
        hx2, hy2 = hand
        d.line([(hx2, hy2), (hx2 - 0.03 * u, hy2 + 0.05 * u)], fill=_shade(c_rgb, 0.7), width=max(1, int(0.01 * u)))
        d.polygon([(hx2 - 0.09 * u, hy2 + 0.04 * u), (hx2 + 0.03 * u, hy2 + 0.04 * u), (hx2 + 0.05 * u, hy2 + 0.14 * u),
                   (hx2 - 0.11 * u, hy2 + 0.14 * u)], fill=c_rgb)
    elif carried == "umbrella":
        if umbrella_open:
            ccx, ccy, r = hx + 0.02 * u, top - 0.02 * u, 0.2 * u
            d.line([hand, (ccx, ccy)], fill=(60, 60, 60), width=max(1, int(0.01 * u)))
            d.pieslice([ccx - r, ccy - r * 0.7, ccx + r, ccy + r * 0.7], 180, 360, fill=c_rgb)
        else:  # closed, hanging from the hand, tip on the ground
            x, y = hand
            d.polygon([(x - 0.025 * u, y + 0.04 * u), (x + 0.025 * u, y + 0.04 * u), (x + 0.005 * u, ankle_y),
                       (x - 0.005 * u, ankle_y)], fill=c_rgb)
            d.arc([x - 0.03 * u, y - 0.02 * u, x + 0.01 * u, y + 0.04 * u], 180, 360, fill=(50, 50, 50),
                  width=max(1, int(0.01 * u)))
    return {"facing": facing, "upper_box": None if side and upper == "vest" else box}


def render_image(ident, seed, pid, k, height=256, width=128):
    """Image k of identity ident -> (PIL RGB image before JPEG, info). Depends only on (ident, seed, pid, k, size)."""
    rng = random.Random(f"synth-pedes/{seed}/{pid}/{k}")
    nrng = np.random.default_rng([seed, pid, k])
    ss = 2  # draw at 2x and downsample: cheap anti-aliasing
    W, H = width * ss, height * ss
    img = _background(rng, nrng, width, height).resize((W, H), Image.NEAREST)  # 1x: the figure needs the 2x
    u = H * rng.uniform(0.74, 0.9) * ident["height"]
    top = rng.uniform(0.03 * H, H - u - 0.01 * H)
    cx = W * rng.uniform(0.4, 0.6)
    info = _draw_person(ImageDraw.Draw(img), ident, rng, cx, top, u)
    img = img.reduce(ss)
    if info["upper_box"]:
        info["upper_box"] = [int(round(v / ss)) for v in info["upper_box"]]
    # lighting: modest brightness/contrast/tint so garment colours stay nameable; then sensor noise
    arr = np.asarray(img, dtype=np.float32)
    contrast, bright = rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15)
    gain = np.array([rng.uniform(0.97, 1.03) for _ in range(3)], dtype=np.float32)
    arr = arr * (gain * contrast * bright) + 128 * (1 - contrast) * bright * gain  # ((x-128)c+128)*b*gain
    arr += nrng.standard_normal(arr.shape, dtype=np.float32) * rng.uniform(1, 5)
    img = Image.fromarray(np.clip(arr, 0, 255, out=arr).astype(np.uint8))
    if rng.random() < 0.4:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    info["quality"] = rng.randint(60, 95)
    return img, info


def make_records(job):
    """All images + records of one identity: writes DIR/Part1/<pid>/<k>.jpg, returns the JSON records."""
    out, seed, pid, n_img, height, width, zh, split = job
    ident = make_identity(seed, pid)
    folder = Path(out) / "Part1" / str(pid)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for k in range(n_img):
        img, info = render_image(ident, seed, pid, k, height, width)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=info["quality"])
        (folder / f"{k}.jpg").write_bytes(buf.getvalue())
        rng = random.Random(f"synth-pedes/{seed}/{pid}/{k}/captions")
        pairs = []
        for _ in range(40):  # distinct captions; a bare attribute string may allow only a few
            pair = captions.compose_caption_pair(ident["attributes"], rng)
            if pair[0] not in [p[0] for p in pairs]:
                pairs.append(pair)
            if len(pairs) == (2 if k % 2 == 0 else 3):
                break
        rec = {"id": pid, "file_path": f"Part1/{pid}/{k}.jpg", "attributes": ident["attributes"],
               "captions": [en for en, _ in pairs]}
        if zh:
            rec["captions_zh"] = [z for _, z in pairs]
        rec["prompt_caption"] = [captions.prompt_caption(ident["attributes"])]
        if split:
            rec["split"] = split
        records.append(rec)
    return records


def generate(out, ids, images_per_id, seed=0, height=256, width=128, zh=True, workers=1, extra_train_ids=0):
    """Write the dataset under out; returns the JSON path. Same arguments -> byte-identical files.

    extra_train_ids: ids `ids` .. `ids + extra_train_ids - 1` more, marked "split": "train", so that a larger
    training set leaves the hash-chosen test and validation identities among the first `ids` exactly as they are
    (every identity depends only on (seed, pid), so ids 0 .. ids-1 are byte-identical either way)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        fail(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), seed, pid, images_per_id, height, width, zh, None if pid < ids else "train")
            for pid in range(ids + extra_train_ids)]
    if workers > 1 and len(jobs) * images_per_id >= 200:
        # spawn, not fork: the caller may have torch/OpenMP threads running; imap keeps id order
        with get_context("spawn").Pool(workers) as pool:
            per_id = list(pool.imap(make_records, jobs, chunksize=8))
    else:
        per_id = [make_records(j) for j in jobs]
    records = [r for rs in per_id for r in rs]
    path = out / JSON_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return path


def get_args_parser(add_help=True):
    p = argparse.ArgumentParser(description="synthetic SYNTH-PEDES-format data", add_help=add_help)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--ids", type=int, default=100, help="number of identities")
    p.add_argument("--images_per_id", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--extra_train_ids", type=int, default=0,
                   help="this many more identities after --ids, all marked split 'train' (more training people, "
                        "same test/validation identities)")
    p.add_argument("--no_zh", action="store_true", help="omit captions_zh")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    return p


def main(args):
    if args.ids < 1 or args.images_per_id < 1:
        fail("--ids and --images_per_id must be >= 1")
    if args.extra_train_ids < 0:
        fail("--extra_train_ids must be >= 0")
    if args.seed < 0:
        fail("--seed must be >= 0")
    if args.height < 32 or args.width < 16:
        fail("--height must be >= 32 and --width >= 16")
    if args.workers < 1:
        fail("--workers must be >= 1")
    t0 = time.time()
    try:
        path = generate(args.out, args.ids, args.images_per_id, args.seed, args.height, args.width,
                        zh=not args.no_zh, workers=args.workers, extra_train_ids=args.extra_train_ids)
    except OSError as e:
        fail(f"cannot write to {args.out}: {e.strerror or e}")
    n_ids = args.ids + args.extra_train_ids
    print(f"wrote {n_ids * args.images_per_id} images of {n_ids} ids ({args.height}x{args.width}) "
          f"and {path} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
