"""Drawing the synthetic biomedical world: one picture per hidden scene, for the paper's five domains.

LLaVA-Med (paper §3, Fig. 2) learns from PMC figures of five kinds: chest X-ray, CT, MRI, histology and
gross pathology. These functions paint stand-ins for them with numpy + pillow, plus the everyday shapes of
the general-domain set. Every finding that a caption or a VQA answer names is drawn large and with high
contrast, so that it is still visible after the tiny model's 128 -> 64 pixel resize; everything else
(positions, intensities, texture, noise) is jittered so that no two images are equal.

Coordinates are fractions of the image side (0..1), x to the right, y down, so one scene draws the same
at any image size. Radiology follows the radiological convention: the patient's right is on the image's
left, so a "right" lesion sits at x < 0.5.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def _stamp(img: np.ndarray, cx: float, cy: float, rx: float, ry: float, value, *, angle: float = 0.0,
           soft: float = 1.0, alpha: float = 1.0, wobble: list[tuple[int, float, float]] | None = None) -> None:
    """Blend an ellipse of colour `value` into `img` (H,W) or (H,W,C), in place, with an edge `soft`
    pixels wide; `wobble` = [(k, amplitude, phase)] bends its outline into an irregular blob."""
    n = img.shape[0]
    cxp, cyp, rxp, ryp = cx * n, cy * n, max(rx * n, 0.5), max(ry * n, 0.5)
    reach = max(rxp, ryp) * (1.0 + sum(a for _, a, _ in wobble or [])) + 2 * soft + 1
    x0, x1 = max(int(cxp - reach), 0), min(int(cxp + reach) + 1, n)
    y0, y1 = max(int(cyp - reach), 0), min(int(cyp + reach) + 1, n)
    if x0 >= x1 or y0 >= y1:
        return
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    dx, dy = xs - cxp, ys - cyp
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    rho = np.hypot(dx / rxp, dy / ryp)  # 1 on the outline
    if wobble:
        theta = np.arctan2(dy, dx)
        rho = rho / (1.0 + sum(a * np.cos(k * theta + p) for k, a, p in wobble))
    # (1 - rho) * radius approximates the signed distance to the outline in pixels.
    m = np.clip((1.0 - rho) * min(rxp, ryp) / soft + 0.5, 0.0, 1.0) * alpha
    region = img[y0:y1, x0:x1]
    if img.ndim == 3:
        m = m[..., None]
    region += (np.asarray(value, dtype=np.float32) - region) * m


def _wobble(rng: np.random.Generator, amount: float) -> list[tuple[int, float, float]]:
    return [(k, amount * rng.uniform(0.3, 1.0) / k ** 0.5, rng.uniform(0, 2 * math.pi)) for k in (2, 3, 5)]


def _smooth_field(rng: np.random.Generator, n: int, cells: int = 6) -> np.ndarray:
    """Low-frequency noise in [0, 1]: tissue texture and uneven lighting."""
    coarse = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    return np.asarray(coarse.resize((n, n), Image.BICUBIC), dtype=np.float32) / 255.0


def _finish(img: np.ndarray, rng: np.random.Generator, noise: float) -> Image.Image:
    """Blur like an imaging system, add sensor noise, quantise to 8 bits."""
    n = img.shape[0]
    mode = "L" if img.ndim == 2 else "RGB"
    pil = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), mode)
    pil = pil.filter(ImageFilter.GaussianBlur(radius=0.6 * n / 128))
    arr = np.asarray(pil, dtype=np.float32) / 255.0
    arr = arr + rng.normal(0.0, noise, arr.shape).astype(np.float32)
    return Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8), mode)


def _jit(rng: np.random.Generator, scale: float) -> float:
    return float(rng.normal(0.0, scale))


def _lesion_x(side: str, rng: np.random.Generator, offset: float) -> float:
    # Radiological convention: the patient's right is drawn on the image's left.
    return 0.5 + (-offset if side == "right" else offset) + _jit(rng, 0.015)


def draw_chest_xray(facts: dict, rng: np.random.Generator, n: int) -> Image.Image:
    """Frontal chest radiograph: dark lungs, ribs, mediastinum, heart; optional lobar opacity."""
    img = np.full((n, n), 0.04 + _jit(rng, 0.01), dtype=np.float32)
    _stamp(img, 0.5 + _jit(rng, 0.01), 0.64, 0.47, 0.56, 0.32 + _jit(rng, 0.03), soft=3)  # torso
    lung = 0.10 + _jit(rng, 0.02)
    for cx in (0.31, 0.69):
        _stamp(img, cx + _jit(rng, 0.01), 0.47 + _jit(rng, 0.01), 0.15, 0.29, lung, soft=4)
    for k in range(6):  # ribs: faint thin arcs across each lung
        for side in (-1, 1):
            _stamp(img, 0.5 + side * 0.19, 0.24 + 0.085 * k, 0.19, 0.014, 0.3, angle=side * 0.35,
                   soft=1.5, alpha=0.35)
    _stamp(img, 0.5, 0.46, 0.055, 0.36, 0.48, soft=2)  # mediastinum and spine
    for side in (-1, 1):  # clavicles
        _stamp(img, 0.5 + side * 0.17, 0.16, 0.16, 0.018, 0.6, angle=side * 0.25, soft=1.5)
    # The heart sits left of the patient's midline, i.e. right of the image centre; an enlarged heart
    # is drawn much wider so the difference survives downsizing.
    half_width = 0.22 if facts["heart_enlarged"] == "yes" else 0.12
    _stamp(img, 0.545 + _jit(rng, 0.01), 0.70, half_width * (1 + _jit(rng, 0.04)), 0.14,
           0.58 + _jit(rng, 0.03), soft=3)
    if facts["opacity"] == "yes":
        side, level = facts["lobe"].split()[:2]
        cy = (0.32 if level == "upper" else 0.56) + _jit(rng, 0.015)
        _stamp(img, _lesion_x(side, rng, 0.205), cy, 0.085, 0.075, 0.72 + _jit(rng, 0.04), soft=4,
               wobble=_wobble(rng, 0.15))
    return _finish(img, rng, noise=0.02)


def draw_ct(facts: dict, rng: np.random.Generator, n: int) -> Image.Image:
    """Axial CT of the chest (lesion: bright nodule in a lung) or abdomen (dark lesion in a kidney)."""
    img = np.zeros((n, n), dtype=np.float32)
    _stamp(img, 0.5, 0.93, 0.45, 0.02, 0.35, soft=1)  # scanner table
    _stamp(img, 0.5 + _jit(rng, 0.01), 0.5, 0.44, 0.33, 0.38 + _jit(rng, 0.02), soft=2)  # fat
    _stamp(img, 0.5, 0.5, 0.41, 0.30, 0.46 + _jit(rng, 0.02), soft=2)  # muscle and organs
    present = facts["lesion"] == "yes"
    radius = 0.09 if facts.get("size") == "large" else 0.045
    if facts["region"] == "chest":
        for cx in (0.3, 0.7):
            _stamp(img, cx + _jit(rng, 0.01), 0.46, 0.16, 0.21, 0.04, soft=2)  # lungs
        _stamp(img, 0.52, 0.44, 0.10, 0.12, 0.56, soft=2)  # heart
        _stamp(img, 0.5, 0.74, 0.05, 0.05, 0.95, soft=1.5)  # vertebra
        if present:
            _stamp(img, _lesion_x(facts["side"], rng, 0.21), 0.45 + _jit(rng, 0.03), radius, radius,
                   0.72, soft=1.5, wobble=_wobble(rng, 0.12))
    else:
        _stamp(img, 0.36, 0.37, 0.19, 0.13, 0.56, soft=2)  # liver, on the patient's right
        _stamp(img, 0.66, 0.36, 0.10, 0.08, 0.30, soft=2)  # stomach
        for cx in (0.32, 0.68):
            _stamp(img, cx + _jit(rng, 0.01), 0.63, 0.095, 0.12, 0.70, soft=2)  # kidneys
        _stamp(img, 0.5, 0.66, 0.05, 0.05, 0.95, soft=1.5)  # vertebra
        _stamp(img, 0.5, 0.56, 0.025, 0.025, 0.80, soft=1)  # aorta
        if present:
            _stamp(img, _lesion_x(facts["side"], rng, 0.18), 0.63 + _jit(rng, 0.01), radius, radius,
                   0.12, soft=1.5)
    return _finish(img, rng, noise=0.02)


def draw_mri(facts: dict, rng: np.random.Generator, n: int) -> Image.Image:
    """Axial T2-weighted brain MRI: bright CSF in the ventricles; optional hyperintense lesion."""
    img = np.zeros((n, n), dtype=np.float32)
    cx = 0.5 + _jit(rng, 0.01)
    _stamp(img, cx, 0.5, 0.37, 0.45, 0.45 + _jit(rng, 0.03), soft=2)  # scalp
    _stamp(img, cx, 0.5, 0.34, 0.42, 0.05, soft=1.5)  # skull (dark on MRI)
    _stamp(img, cx, 0.5, 0.32, 0.40, 0.50 + _jit(rng, 0.03), soft=1.5)  # grey matter
    _stamp(img, cx, 0.5, 0.25, 0.32, 0.36 + _jit(rng, 0.03), soft=3)  # white matter
    _stamp(img, cx, 0.5, 0.006, 0.38, 0.7, soft=1)  # falx
    for side in (-1, 1):
        _stamp(img, cx + side * 0.04, 0.49, 0.03, 0.11, 0.92, angle=side * 0.25, soft=1.5)  # ventricles
    if facts["lesion"] == "yes":
        radius = 0.085 if facts["size"] == "large" else 0.04
        _stamp(img, _lesion_x(facts["side"], rng, 0.19), 0.45 + _jit(rng, 0.05), radius, radius * 0.9,
               0.97, soft=2, wobble=_wobble(rng, 0.12))
    return _finish(img, rng, noise=0.02)


STAIN_COLOURS = {
    # background, tissue, nucleus, atypical nucleus (RGB 0..1)
    "h&e": ((0.97, 0.80, 0.88), (0.90, 0.52, 0.70), (0.40, 0.22, 0.58), (0.20, 0.06, 0.33)),
    # IHC: pale haematoxylin counterstain, atypical (positive) cells brown from DAB.
    "ihc": ((0.96, 0.94, 0.90), (0.84, 0.78, 0.68), (0.32, 0.40, 0.75), (0.45, 0.24, 0.08)),
    # Masson trichrome: blue collagen with islands of red cytoplasm, near-black nuclei.
    "trichrome": ((0.32, 0.48, 0.92), (0.88, 0.22, 0.26), (0.22, 0.10, 0.26), (0.10, 0.03, 0.10)),
}


def draw_histology(facts: dict, rng: np.random.Generator, n: int) -> Image.Image:
    """Stained tissue section: stain colours, many or few nuclei, optional large dark atypical nuclei."""
    background, tissue, nucleus, atypical = (np.array(c, dtype=np.float32) for c in STAIN_COLOURS[facts["stain"]])
    field = _smooth_field(rng, n)[..., None]
    # Trichrome tissue comes as separate red islands in blue collagen; the other stains shade smoothly.
    mix = np.clip((field - 0.55) * 5, 0, 1) if facts["stain"] == "trichrome" else 0.25 + 0.6 * field
    img = background + (tissue - background) * mix
    img = img + rng.normal(0, 0.02, 3).astype(np.float32)  # batch-to-batch stain variation
    # Far apart in count and large enough (~3 px at 64 px) that density reads as overall darkness.
    count = 120 if facts["density"] == "high" else 15
    for _ in range(count):
        r = rng.uniform(0.026, 0.034)
        _stamp(img, rng.uniform(0, 1), rng.uniform(0, 1), r, r * rng.uniform(0.7, 1.0), nucleus,
               angle=rng.uniform(0, math.pi), soft=1.0, alpha=rng.uniform(0.7, 0.95))
    if facts["atypia"] == "yes":
        # Twice the radius of a normal nucleus or more (~5 px at 64 px): the tiny vision tower sees 16 px
        # patches, and at 3 px atypia was read at chance.
        for _ in range(int(rng.integers(3, 6))):
            r = rng.uniform(0.07, 0.085)
            _stamp(img, rng.uniform(0.12, 0.88), rng.uniform(0.12, 0.88), r, r * rng.uniform(0.75, 1.0),
                   atypical, angle=rng.uniform(0, math.pi), soft=1.0, wobble=_wobble(rng, 0.2))
    return _finish(img, rng, noise=0.015)


LESION_COLOURS = {"white": (0.94, 0.92, 0.86), "red": (0.50, 0.05, 0.09), "yellow": (0.93, 0.80, 0.28)}


def draw_gross(facts: dict, rng: np.random.Generator, n: int) -> Image.Image:
    """Photograph of a resected specimen on a drape, with a ruler; optional coloured lesion."""
    drape = np.array((0.10, 0.28, 0.30) if rng.random() < 0.5 else (0.22, 0.24, 0.40), dtype=np.float32)
    img = drape * (0.8 + 0.4 * _smooth_field(rng, n, 4)[..., None])
    _stamp(img, 0.5, 0.93, 0.42, 0.035, (0.92, 0.92, 0.88), soft=1)  # ruler
    for k in range(17):
        _stamp(img, 0.1 + 0.05 * k, 0.915, 0.003, 0.014 if k % 2 else 0.022, (0.1, 0.1, 0.1), soft=0.7)
    cx, cy = 0.5 + _jit(rng, 0.03), 0.46 + _jit(rng, 0.02)
    tan = np.array((0.80, 0.56, 0.48), dtype=np.float32) + rng.normal(0, 0.03, 3).astype(np.float32)
    _stamp(img, cx, cy, 0.33, 0.27, tan, angle=_jit(rng, 0.3), soft=2, wobble=_wobble(rng, 0.1))
    shade = 0.85 + 0.3 * _smooth_field(rng, n, 5)[..., None]  # uneven lighting of the cut surface
    img = img * shade
    if facts["lesion"] == "yes":
        # A small lesion still covers most of a 16 px patch at 64 px, so its colour can be read.
        radius = 0.17 if facts["size"] == "large" else 0.1
        _stamp(img, cx + _jit(rng, 0.05), cy + _jit(rng, 0.04), radius, radius * 0.85,
               LESION_COLOURS[facts["color"]], angle=rng.uniform(0, math.pi), soft=1.5,
               wobble=_wobble(rng, 0.2))
    return _finish(img, rng, noise=0.015)


# Brown is a coloured surface like most that objects are photographed on, not only a neutral one.
BACKGROUNDS = {"white": (245, 245, 245), "gray": (150, 150, 150), "black": (15, 15, 15), "brown": (160, 110, 80)}
SHAPE_COLOURS = {"red": (225, 30, 30), "green": (30, 170, 50), "blue": (40, 80, 230), "yellow": (245, 215, 30)}
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
             "center": (0.5, 0.5)}


def draw_general(facts: dict, rng: np.random.Generator, n: int) -> Image.Image:
    """Everyday picture for the general-domain base model: one coloured shape over a cluttered background.

    The clutter (uneven texture and faint grey blobs) is what makes the base model's vision tower learn to
    find one salient object among distractors, as a lesion must be found among anatomy later; on plain
    backgrounds it only learns colours and positions of the whole picture."""
    base = np.asarray(BACKGROUNDS[facts["background"]], dtype=np.float32) / 255.0
    texture = (_smooth_field(rng, n, cells=int(rng.integers(4, 10))) - 0.5) * 0.25
    pil = Image.fromarray((np.clip(base + texture[..., None], 0, 1) * 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(2, 6))):  # distractors: low-contrast grey, never one of the shape colours
        bx, by, br = rng.random() * n, rng.random() * n, (0.04 + 0.08 * rng.random()) * n
        grey = int(np.clip(base.mean() * 255 + rng.choice([-1, 1]) * rng.uniform(25, 45), 0, 255))
        draw.ellipse((bx - br, by - br * 0.7, bx + br, by + br * 0.7), fill=(grey, grey, grey))
    px, py = POSITIONS[facts["position"]]
    cx, cy = (px + _jit(rng, 0.02)) * n, (py + _jit(rng, 0.02)) * n
    r = (0.22 if facts["size"] == "large" else 0.11) * n * (1 + _jit(rng, 0.05))
    colour = SHAPE_COLOURS[facts["color"]]
    if facts["shape"] == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif facts["shape"] == "square":
        draw.rectangle((cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9), fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r * 1.05, cy + r * 0.8), (cx + r * 1.05, cy + r * 0.8)], fill=colour)
    return _finish(np.asarray(pil, dtype=np.float32) / 255.0, rng, noise=0.01)


DRAW = {"chest_xray": draw_chest_xray, "ct_scan": draw_ct, "mri": draw_mri, "histology": draw_histology,
        "gross": draw_gross, "general": draw_general}
