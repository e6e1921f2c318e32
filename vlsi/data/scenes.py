"""Vocabulary and drawing for the synthetic visual-QA scenes (numpy-free, Pillow only).

Two kinds of image:

* a **grid scene**: a square image cut into ``grid`` x ``grid`` cells, at most one object per
  cell (:func:`render_grid`);
* a **sequence**: a row of :data:`SEQUENCE_PANELS` framed panels, one object per panel, the
  last panel showing a question mark instead (:func:`render_sequence`).

Drawing is a pure function of its arguments (no randomness here: the jitter of each object is
part of :class:`Obj`), so the same scene always gives the same pixels and PNG bytes.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from PIL import Image, ImageDraw

RGB = tuple[int, int, int]

#: Object colours, in vocabulary order. Kept far apart in RGB and from the grey background.
COLOURS: dict[str, RGB] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 220),
    "yellow": (240, 215, 40),
    "purple": (150, 50, 200),
    "orange": (240, 130, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
#: Shapes, chosen to stay distinct at ~10 px: no hexagon (reads as a circle when small).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
SHAPE_PLURALS: dict[str, str] = {
    "circle": "circles", "square": "squares", "triangle": "triangles",
    "star": "stars", "diamond": "diamonds", "cross": "crosses",
}
SIZES: tuple[str, ...] = ("small", "large")
#: Style values; in text an outline object is called "outlined".
STYLES: tuple[str, ...] = ("filled", "outline")
STYLE_ADJECTIVES: dict[str, str] = {"filled": "filled", "outline": "outlined"}
MAX_DOTS = 3

#: Mid-grey near the CLIP pixel mean: the image-dependent part of a random vision tower's
#: output is about twice as large as on white (see the project notes).
DEFAULT_BACKGROUND: RGB = (122, 117, 104)
NAMED_BACKGROUNDS: dict[str, RGB] = {
    "grey": DEFAULT_BACKGROUND, "gray": DEFAULT_BACKGROUND,
    "white": (255, 255, 255), "black": (0, 0, 0),
}
#: A palette colour this close (Euclidean RGB) to the background is not used in scenes.
MIN_BACKGROUND_DISTANCE = 80.0

_ROWS = {2: ("top", "bottom"), 3: ("top", "", "bottom"), 4: ("top", "upper", "lower", "bottom")}
_COLS = {2: ("left", "right"), 3: ("left", "", "right"), 4: ("far left", "left", "right", "far right")}


def _position_names(grid: int) -> tuple[str, ...]:
    names = []
    for r in _ROWS[grid]:
        for c in _COLS[grid]:
            names.append(f"{r} {c}".strip() or "center")
    return tuple(names)


#: Cell names in row-major order, per supported grid size (2..4).
POSITION_NAMES: dict[int, tuple[str, ...]] = {g: _position_names(g) for g in (2, 3, 4)}
#: Cell names of the default 3 x 3 grid.
POSITIONS: tuple[str, ...] = POSITION_NAMES[3]

SEQUENCE_PANELS = 4  # three shown panels and the "?" panel: patterns of period <= 2 are unambiguous


@dataclass(frozen=True)
class Obj:
    """One drawn object. ``cell`` is the row-major cell index (grid) or the panel index."""

    colour: str
    shape: str
    size: str = "large"
    style: str = "filled"
    dots: int = 0
    cell: int = 0
    dx: int = 0
    """Jitter of the centre in pixels (part of the scene, so drawing stays deterministic)."""
    dy: int = 0


def luminance(rgb: RGB) -> float:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def contrast(rgb: RGB) -> RGB:
    """Black or white, whichever stands out on ``rgb``."""
    return (0, 0, 0) if luminance(rgb) > 140 else (255, 255, 255)


def usable_colours(background: RGB) -> tuple[str, ...]:
    """Palette colours far enough from ``background`` to be seen on it."""
    return tuple(
        c for c, rgb in COLOURS.items() if math.dist(rgb, background) >= MIN_BACKGROUND_DISTANCE
    )


# --------------------------------------------------------------------------- shape outlines

def _unit_polygon(shape: str) -> list[tuple[float, float]] | None:
    """Vertices on a unit radius around (0, 0); None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        s = 0.8
        return [(-s, -s), (s, -s), (s, s), (-s, s)]
    if shape == "diamond":  # a rhombus, narrower than tall: not a turned square
        return [(0.0, -1.0), (0.68, 0.0), (0.0, 1.0), (-0.68, 0.0)]
    if shape == "triangle":  # pointing up, centroid at the origin
        return [(0.0, -1.0), (0.95, 0.65), (-0.95, 0.65)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = 1.0 if k % 2 == 0 else 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a) + 0.08))
        return pts
    if shape == "cross":
        a, t = 0.9, 0.3
        return [(-t, -a), (t, -a), (t, -t), (a, -t), (a, t), (t, t),
                (t, a), (-t, a), (-t, t), (-a, t), (-a, -t), (-t, -t)]
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


_UNIT = {s: _unit_polygon(s) for s in SHAPES}


def draw_object(draw: ImageDraw.ImageDraw, obj: Obj, cx: float, cy: float, radius: float,
                background: RGB) -> None:
    """Draw ``obj`` centred on (cx, cy) within ``radius`` pixels, with its dots."""
    rgb = COLOURS[obj.colour]
    width = max(1, round(radius / 4))
    unit = _UNIT[obj.shape]
    filled = obj.style == "filled"
    if unit is None:
        box = [cx - radius, cy - radius, cx + radius, cy + radius]
        if filled:
            draw.ellipse(box, fill=rgb)
        else:
            draw.ellipse(box, outline=rgb, width=width)
    else:
        pts = [(cx + x * radius, cy + y * radius) for x, y in _UNIT[obj.shape]]
        if filled:
            draw.polygon(pts, fill=rgb)
        else:
            draw.polygon(pts, outline=rgb, width=width)
    if obj.dots:
        # dots in a horizontal row through the centre: inside every shape (the cross's arm too)
        ink = contrast(rgb) if filled else rgb
        r = max(1.0, radius * 0.1)
        step = max(2 * r + 2.5, radius * 0.42)  # a clear gap between dots, even when tiny
        y = cy + (0.3 * radius if obj.shape == "triangle" else 0.0)
        for k in range(obj.dots):
            x = cx + (k - (obj.dots - 1) / 2) * step
            draw.ellipse([x - r, y - r, x + r, y + r], fill=ink)


# --------------------------------------------------------------------------- images

def object_radius(image_size: int, grid: int, size: str) -> float:
    cell = image_size / grid
    return cell * (0.40 if size == "large" else 0.25)


def max_jitter(image_size: int, grid: int, size: str) -> int:
    """Largest centre offset (px) that keeps an object inside its cell with a margin."""
    cell = image_size / grid
    return max(0, int((cell / 2 - object_radius(image_size, grid, size)) * 0.6))


def render_grid(objects: list[Obj], image_size: int, grid: int, background: RGB) -> Image.Image:
    img = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(img)
    cell = image_size / grid
    for o in objects:
        row, col = divmod(o.cell, grid)
        cx = (col + 0.5) * cell + o.dx
        cy = (row + 0.5) * cell + o.dy
        draw_object(draw, o, cx, cy, object_radius(image_size, grid, o.size), background)
    return img


def _question_mark(draw: ImageDraw.ImageDraw, cx: float, cy: float, h: float, ink: RGB) -> None:
    w = max(1, round(h / 8))
    r = h * 0.22
    draw.arc([cx - r, cy - h / 2, cx + r, cy - h / 2 + 2 * r], start=180, end=90, fill=ink, width=w)
    draw.line([(cx, cy - h / 2 + 2 * r), (cx, cy + h * 0.15)], fill=ink, width=w)
    d = max(1.0, h / 12)
    draw.ellipse([cx - d, cy + h * 0.32 - d, cx + d, cy + h * 0.32 + d], fill=ink)


def render_sequence(panels: list[Obj], image_size: int, background: RGB) -> Image.Image:
    """Shown panels, then a ``?`` panel, in one row across the middle of the image."""
    n = len(panels) + 1
    img = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(img)
    pw = image_size / n
    top = (image_size - pw) / 2
    frame = tuple(int(v * 0.6) for v in background)
    for k in range(n):
        x0 = k * pw
        draw.rectangle([x0, top, x0 + pw - 1, top + pw - 1], outline=frame, width=1)
        cx, cy = x0 + pw / 2, top + pw / 2
        if k < len(panels):
            draw_object(draw, panels[k], cx, cy, pw * 0.38, background)
        else:
            _question_mark(draw, cx, cy, pw * 0.6, contrast(background))
    return img


def png_bytes(img: Image.Image) -> bytes:
    """PNG with fixed parameters and no metadata: same pixels, same bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1, optimize=False)
    return buf.getvalue()
