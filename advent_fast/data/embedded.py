"""Embedded default data: procedural street scenes in a synthetic source style and a shifted real style.

The source set is written in the GTA5 layout (paletted label PNGs whose indices are Cityscapes label
ids), the target set in the Cityscapes layout (train images without labels, val images with
``*_gtFine_labelIds.png``), so that a default run goes through the same readers as the real data.

The two domains differ the way GTA5 and Cityscapes do: palette (saturated, sunny game colours vs
overcast, desaturated ones), illumination (flat vs vignetted, shaded, darker), texture and sensor
noise, blur, and layout statistics (horizon height, road width, how many cars, people, poles; an ego
vehicle hood in the target). Every image depends only on (seed, domain, index), so the sets are the
same whatever the number of worker processes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image

from advent_fast.data.classes import NAME_TO_LABEL_ID, label_id_palette

__all__ = [
    "EmbeddedData",
    "SOURCE_STYLE",
    "TARGET_STYLE",
    "default_cache_root",
    "ensure_embedded_data",
    "generate_embedded_data",
    "render_scene",
]

GENERATOR_VERSION = 3  # part of the cache folder name: bump whenever the images change
SOURCE_SIZE = (256, 144)  # (width, height), GTA5's aspect; also the source training size
TARGET_NATIVE_SIZE = (512, 256)  # Cityscapes' 2:1, the label (evaluation) resolution
TARGET_INPUT_SIZE = (256, 128)  # half the label size, as 1024x512 is for 2048x1024
TRAIN_CITIES = ("aachen", "bochum", "bremen", "cologne", "darmstadt")
VAL_CITIES = ("frankfurt", "lindau", "munster")

RGB = Tuple[int, int, int]
ID = NAME_TO_LABEL_ID


class EmbeddedData(NamedTuple):
    """Where the embedded sets are and the sizes a run should use with them ((width, height))."""

    root: str
    source_root: str  # GTA5 layout
    target_root: str  # Cityscapes layout, val with labels
    source_size: Tuple[int, int] = SOURCE_SIZE
    target_size: Tuple[int, int] = TARGET_INPUT_SIZE
    label_size: Tuple[int, int] = TARGET_NATIVE_SIZE
    num_classes: int = 19


@dataclass(frozen=True)
class SceneStyle:
    """Layout statistics and appearance of one domain."""

    name: str
    colours: Dict[str, RGB]  # base colour per class name
    building_colours: Tuple[RGB, ...]
    vehicle_colours: Tuple[RGB, ...]
    clothing_colours: Tuple[RGB, ...]
    window_colour: RGB
    colour_jitter: float
    # layout
    horizon: Tuple[float, float]  # fraction of the height
    road_bottom_width: Tuple[float, float]  # fraction of the width, at the bottom row
    sidewalk_bottom_width: Tuple[float, float]
    roof_height: Tuple[float, float]  # above the horizon at the image edge, fraction of the height
    vegetation_segment: float  # chance that a roadside segment is trees instead of a building
    cars: Tuple[int, int]
    big_vehicles: Tuple[int, int]
    people: Tuple[int, int]
    riders: Tuple[int, int]
    poles: Tuple[int, int]
    trees: Tuple[int, int]
    lane_markings: float
    ego_vehicle: float
    train: float
    # appearance
    texture: float  # low-frequency multiplicative stains
    grain: Dict[str, float]  # per-class pixel grain (std, 0..255)
    sensor_noise: float
    blur: float  # Gaussian sigma at 512 pixels of width
    saturation: float
    tint: Tuple[float, float, float]
    brightness: Tuple[float, float]
    gamma: Tuple[float, float]
    shading: float  # left-right illumination ramp
    vignette: float


SOURCE_STYLE = SceneStyle(
    name="synthetic",
    colours={
        "sky": (95, 165, 240), "road": (85, 80, 92), "sidewalk": (185, 172, 160), "wall": (205, 190, 150),
        "fence": (165, 120, 75), "pole": (125, 125, 140), "traffic light": (35, 35, 35),
        "traffic sign": (235, 205, 25), "vegetation": (55, 165, 45), "terrain": (160, 205, 85),
        "truck": (225, 225, 215), "bus": (240, 185, 35), "train": (205, 55, 45), "skin": (225, 180, 150),
        "motorcycle": (30, 30, 35), "bicycle": (190, 30, 40), "parking": (150, 120, 130),
        "static": (140, 110, 80), "ground": (150, 120, 90),
    },
    building_colours=((205, 170, 115), (175, 85, 65), (150, 150, 165), (225, 212, 190), (110, 130, 170)),
    vehicle_colours=((205, 30, 30), (30, 60, 205), (240, 240, 240), (25, 25, 25), (235, 185, 0),
                     (40, 155, 60), (150, 150, 165)),
    clothing_colours=((200, 40, 40), (40, 70, 190), (240, 240, 240), (30, 30, 30), (60, 150, 60),
                      (230, 200, 40)),
    window_colour=(150, 200, 235),
    colour_jitter=8.0,
    horizon=(0.42, 0.52),
    road_bottom_width=(0.9, 1.3),
    sidewalk_bottom_width=(0.25, 0.45),
    roof_height=(0.35, 0.55),
    vegetation_segment=0.25,
    cars=(2, 6),
    big_vehicles=(0, 2),
    people=(0, 3),
    riders=(0, 1),
    poles=(1, 3),
    trees=(0, 3),
    lane_markings=0.8,
    ego_vehicle=0.0,
    train=0.08,
    texture=0.03,
    grain={"vegetation": 6.0, "terrain": 4.0, "road": 2.0},
    sensor_noise=1.5,
    blur=0.0,
    saturation=1.1,
    tint=(1.0, 1.0, 1.0),
    brightness=(0.95, 1.15),
    gamma=(0.9, 1.0),
    shading=0.05,
    vignette=0.0,
)

# The target palette and photometry lie about a third of the way from the source's towards an
# overcast, desaturated, noisy camera look: far enough that a source-only model loses most of its
# accuracy (about 46 -> 17 mIoU for deeplabv2_small), near enough for adaptation to have a signal.
TARGET_STYLE = SceneStyle(
    name="real",
    colours={
        "sky": (134, 181, 231), "road": (94, 90, 96), "sidewalk": (173, 161, 149), "wall": (179, 168, 139),
        "fence": (144, 114, 83), "pole": (106, 107, 118), "traffic light": (33, 33, 33),
        "traffic sign": (214, 191, 41), "vegetation": (61, 138, 46), "terrain": (145, 175, 85),
        "truck": (200, 200, 190), "bus": (228, 192, 91), "train": (198, 100, 90), "skin": (209, 170, 143),
        "motorcycle": (34, 34, 38), "bicycle": (144, 40, 49), "parking": (142, 119, 126),
        "static": (124, 103, 82), "ground": (140, 117, 94),
    },
    building_colours=((177, 151, 111), (167, 105, 86), (131, 130, 139), (195, 180, 161), (131, 142, 165)),
    vehicle_colours=((148, 34, 36), (76, 95, 191), (231, 231, 231), (38, 38, 45), (185, 132, 12),
                     (65, 140, 75)),
    clothing_colours=((144, 40, 42), (50, 70, 155), (194, 191, 188), (72, 72, 72), (70, 112, 53)),
    window_colour=(117, 151, 177),
    colour_jitter=14.0,
    horizon=(0.32, 0.42),
    road_bottom_width=(0.7, 1.05),
    sidewalk_bottom_width=(0.3, 0.55),
    roof_height=(0.28, 0.45),
    vegetation_segment=0.35,
    cars=(1, 5),
    big_vehicles=(0, 1),
    people=(1, 6),
    riders=(0, 2),
    poles=(2, 5),
    trees=(1, 4),
    lane_markings=0.3,
    ego_vehicle=0.85,
    train=0.04,
    texture=0.05,
    grain={"vegetation": 10.0, "terrain": 6.0, "road": 3.5, "sidewalk": 2.0, "building": 2.0},
    sensor_noise=3.0,
    blur=0.35,
    saturation=0.94,
    tint=(0.98, 1.0, 1.025),
    brightness=(0.85, 1.1),
    gamma=(0.97, 1.16),
    shading=0.12,
    vignette=0.14,
)


class _Canvas:
    """An RGB image and its label-id map, drawn together so the label is exact by construction."""

    def __init__(self, width: int, height: int, rng: np.random.Generator, style: SceneStyle):
        self.w, self.h, self.rng, self.style = width, height, rng, style
        self.rgb = np.zeros((height, width, 3), np.uint8)
        self.ids = np.zeros((height, width), np.uint8)

    def colour(self, base: RGB, jitter: Optional[float] = None) -> Tuple[int, int, int]:
        spread = self.style.colour_jitter if jitter is None else jitter
        noise = self.rng.normal(0.0, spread, 3).tolist()
        return tuple(min(255, max(0, int(b + n))) for b, n in zip(base, noise))

    def poly(self, points, label: Optional[str], rgb: RGB) -> None:
        pts = [np.round(np.asarray(points, np.float64)).astype(np.int32)]
        cv2.fillPoly(self.rgb, pts, rgb)
        if label is not None:
            cv2.fillPoly(self.ids, pts, ID[label])

    def rect(self, x0, y0, x1, y1, label: Optional[str], rgb: RGB) -> None:
        self.poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], label, rgb)

    def ellipse(self, cx, cy, rx, ry, label: Optional[str], rgb: RGB) -> None:
        centre, axes = (int(round(cx)), int(round(cy))), (max(1, int(round(rx))), max(1, int(round(ry))))
        cv2.ellipse(self.rgb, centre, axes, 0, 0, 360, rgb, -1)
        if label is not None:
            cv2.ellipse(self.ids, centre, axes, 0, 0, 360, ID[label], -1)

    def line(self, p0, p1, thickness: float, label: Optional[str], rgb: RGB) -> None:
        a, b, t = tuple(int(round(v)) for v in p0), tuple(int(round(v)) for v in p1), max(1, int(round(thickness)))
        cv2.line(self.rgb, a, b, rgb, t)
        if label is not None:
            cv2.line(self.ids, a, b, ID[label], t)


class _Street:
    """The road geometry of one scene: a vanishing point, road and sidewalk edges."""

    def __init__(self, c: _Canvas):
        rng, s, w, h = c.rng, c.style, c.w, c.h
        self.horizon = h * rng.uniform(*s.horizon)
        self.vx = w * rng.uniform(0.38, 0.62)
        self.road_top = w * rng.uniform(0.01, 0.03)  # half width at the horizon
        half_bottom = w * rng.uniform(*s.road_bottom_width) / 2
        offset = w * rng.uniform(-0.15, 0.15)
        self.road_bottom = (self.vx + offset - half_bottom, self.vx + offset + half_bottom)
        self.walk_top = w * rng.uniform(0.01, 0.025)
        self.walk_bottom = w * rng.uniform(*s.sidewalk_bottom_width)
        self.height = h

    def depth(self, y: float) -> float:
        """0 at the horizon, 1 at the bottom row."""
        return min(1.0, max(0.0, (y - self.horizon) / (self.height - self.horizon)))

    def road_edges(self, y: float) -> Tuple[float, float]:
        d = self.depth(y)
        left = (self.vx - self.road_top) + d * (self.road_bottom[0] - (self.vx - self.road_top))
        right = (self.vx + self.road_top) + d * (self.road_bottom[1] - (self.vx + self.road_top))
        return left, right

    def walk_edges(self, y: float) -> Tuple[float, float]:
        """Outer sidewalk edges (left, right) at row y."""
        d = self.depth(y)
        left, right = self.road_edges(y)
        width = self.walk_top + d * (self.walk_bottom - self.walk_top)
        return left - width, right + width


def _draw_ground(c: _Canvas, st: _Street) -> None:
    s, h, w = c.style, c.h, c.w
    # Sky with a vertical gradient (darker at the top), then a distant skyline band, then ground.
    top = np.asarray(c.colour(s.colours["sky"]), np.float64) * 0.8
    bottom = np.asarray(c.colour(s.colours["sky"]), np.float64)
    ramp = np.linspace(0.0, 1.0, h)[:, None]
    c.rgb[:] = np.clip(top * (1 - ramp) + bottom * ramp, 0, 255).astype(np.uint8)[:, None, :]
    c.ids[:] = ID["sky"]
    skyline = st.horizon - h * c.rng.uniform(0.02, 0.08)
    distant = s.building_colours[c.rng.integers(len(s.building_colours))]
    c.rect(0, skyline, w, st.horizon + 1, "building", c.colour(distant))
    c.rect(0, st.horizon, w, h, "ground", c.colour(s.colours["ground"]))
    far_l, far_r = st.road_edges(st.horizon)
    walk_l, walk_r = st.walk_edges(st.horizon)
    bl, br = st.road_bottom
    wl, wr = st.walk_edges(h)
    c.poly([(walk_l, st.horizon), (far_l, st.horizon), (bl, h), (wl, h)], "sidewalk", c.colour(s.colours["sidewalk"]))
    c.poly([(far_r, st.horizon), (walk_r, st.horizon), (wr, h), (br, h)], "sidewalk", c.colour(s.colours["sidewalk"]))
    c.poly([(far_l, st.horizon), (far_r, st.horizon), (br, h), (bl, h)], "road", c.colour(s.colours["road"]))
    if c.rng.random() < s.lane_markings:
        # Dashed centre line: colour only, the label stays road.
        for k in range(8):
            y0 = st.horizon + (h - st.horizon) * (k / 8) ** 1.6
            y1 = st.horizon + (h - st.horizon) * ((k + 0.5) / 8) ** 1.6
            x0, x1 = sum(st.road_edges(y0)) / 2, sum(st.road_edges(y1)) / 2
            c.line((x0, y0), (x1, y1), 1 + 0.012 * w * st.depth(y1), None, (230, 230, 225))
    if c.rng.random() < 0.3:
        # A parking bay beside the road (label id 9: not a train class, so ignored).
        y0, y1 = sorted(st.horizon + (h - st.horizon) * c.rng.uniform(0.3, 1.0, 2))
        side = 0 if c.rng.random() < 0.5 else 1
        e0, e1 = st.road_edges(y0), st.road_edges(y1)
        inner = 0.15 if side == 0 else -0.15
        a0 = e0[side] + inner * (e0[1] - e0[0])
        a1 = e1[side] + inner * (e1[1] - e1[0])
        c.poly([(e0[side], y0), (a0, y0), (a1, y1), (e1[side], y1)], "parking", c.colour(s.colours["parking"]))


def _draw_roadside(c: _Canvas, st: _Street) -> None:
    """Facades (or trees and grass) above the outer sidewalk edges, with walls and fences in front."""
    s, h, rng = c.style, c.h, c.rng
    for side in (0, 1):
        far_x, bottom_x = st.walk_edges(st.horizon)[side], st.walk_edges(h)[side]
        near_x = 0.0 if side == 0 else float(c.w)

        def edge_y(x: float) -> float:
            # The outer sidewalk edge: the line from (far_x, horizon) through (bottom_x, bottom row).
            t = (x - far_x) / (bottom_x - far_x)
            return min(h, st.horizon + max(0.0, t) * (h - st.horizon))

        x_from = 0.0
        while x_from < 0.97:  # segments from the image edge towards the vanishing point
            x_to = min(1.0, x_from + rng.uniform(0.12, 0.35))
            xa, xb = near_x + (far_x - near_x) * x_from, near_x + (far_x - near_x) * x_to
            roof_y = _roof_line(st, near_x, h * rng.uniform(*s.roof_height))
            if rng.random() < s.vegetation_segment:
                _draw_park(c, st, xa, xb, roof_y, edge_y)
            else:
                quad = [(xa, roof_y(xa)), (xb, roof_y(xb)), (xb, edge_y(xb) + 1), (xa, edge_y(xa) + 1)]
                c.poly(quad, "building", c.colour(s.building_colours[rng.integers(len(s.building_colours))]))
                _draw_windows(c, xa, xb, roof_y, edge_y)
                front = rng.random()
                if front < 0.2:
                    _draw_band(c, st, xa, xb, edge_y, rng.uniform(0.2, 0.4), "wall", s.colours["wall"])
                elif front < 0.4:
                    _draw_band(c, st, xa, xb, edge_y, rng.uniform(0.15, 0.3), "fence", s.colours["fence"], slats=True)
                elif front < 0.5:
                    _draw_band(c, st, xa, xb, edge_y, rng.uniform(0.1, 0.2), "terrain", s.colours["terrain"])
            x_from = x_to


def _roof_line(st: _Street, near_x: float, roof: float):
    """Roof height ``roof`` above the horizon at the image edge, shrinking towards the vanishing point."""
    return lambda x: st.horizon - roof * abs(x - st.vx) / max(abs(near_x - st.vx), 1.0)


def _draw_windows(c: _Canvas, xa: float, xb: float, roof_y, edge_y) -> None:
    """Rows of windows that follow the facade's perspective (colour only: the label stays building)."""
    columns = max(1, int(abs(xb - xa) / (0.03 * c.w)))
    win = c.colour(c.style.window_colour, 6.0)
    for k in range(columns):
        x0 = xa + (xb - xa) * (k + 0.25) / columns
        x1 = xa + (xb - xa) * (k + 0.7) / columns
        top0, bottom0, top1, bottom1 = roof_y(x0), edge_y(x0), roof_y(x1), edge_y(x1)
        for f in np.arange(0.1, 0.8, 0.16):
            c.poly([(x0, top0 + f * (bottom0 - top0)), (x1, top1 + f * (bottom1 - top1)),
                    (x1, top1 + (f + 0.08) * (bottom1 - top1)), (x0, top0 + (f + 0.08) * (bottom0 - top0))],
                   None, win)


def _draw_band(c: _Canvas, st: _Street, xa, xb, edge_y, relative_height: float, label: str, base: RGB,
               slats: bool = False) -> None:
    """A wall, fence or grass strip standing on the outer sidewalk edge, its height in perspective."""

    def height(x: float) -> float:
        return max(2.0, relative_height * (edge_y(x) - st.horizon))

    ya, yb = edge_y(xa), edge_y(xb)
    rgb = c.colour(base)
    c.poly([(xa, ya - height(xa)), (xb, yb - height(xb)), (xb, yb + 1), (xa, ya + 1)], label, rgb)
    if slats:
        dark = tuple(int(v * 0.6) for v in rgb)
        count = int(abs(xb - xa) / 4)
        for k in range(1, count):
            x = xa + (xb - xa) * k / count
            y = ya + (yb - ya) * k / count
            c.line((x, y - height(x)), (x, y), 1, None, dark)


def _draw_park(c: _Canvas, st: _Street, xa, xb, roof_y, edge_y) -> None:
    """Tree canopies behind a grass strip."""
    s, rng = c.style, c.rng
    for k in range(3):
        x = xa + (xb - xa) * (k + rng.uniform(0.2, 0.8)) / 3
        base = edge_y(x)
        size = max(3.0, 0.6 * (base - roof_y(x)))
        c.ellipse(x, base - size * 0.9, size * rng.uniform(0.5, 0.8), size * 0.6, "vegetation",
                  c.colour(s.colours["vegetation"]))
    _draw_band(c, st, xa, xb, edge_y, rng.uniform(0.1, 0.2), "terrain", s.colours["terrain"])


def _place(c: _Canvas, st: _Street, where: str) -> Tuple[float, float, float]:
    """A random ground point (x, y) on the road or a sidewalk, and the road width there (the scale)."""
    rng = c.rng
    y = st.horizon + (c.h - st.horizon) * rng.uniform(0.08, 1.0) ** 0.7
    left, right = st.road_edges(y)
    if where == "road":
        x = rng.uniform(left, right)
    else:
        walk_left, walk_right = st.walk_edges(y)
        x = rng.uniform(walk_left, left) if rng.random() < 0.5 else rng.uniform(right, walk_right)
    return x, y, right - left


def _draw_car(c: _Canvas, x, y, scale, label="car") -> None:
    s, rng = c.style, c.rng
    big = label in ("truck", "bus")
    width = scale * (rng.uniform(0.38, 0.48) if big else rng.uniform(0.22, 0.32))
    height = width * (rng.uniform(0.8, 1.0) if big else rng.uniform(0.55, 0.7))
    body = c.colour(s.colours[label] if big else s.vehicle_colours[rng.integers(len(s.vehicle_colours))])
    x0, x1 = x - width / 2, x + width / 2
    if label == "car":
        c.rect(x0, y - height * 0.6, x1, y - height * 0.1, label, body)
        c.poly([(x0 + width * 0.15, y - height * 0.6), (x0 + width * 0.25, y - height),
                (x1 - width * 0.25, y - height), (x1 - width * 0.15, y - height * 0.6)], label, body)
        c.rect(x0 + width * 0.28, y - height * 0.92, x1 - width * 0.28, y - height * 0.64, None,
               c.colour(s.window_colour, 6.0))
    else:
        c.rect(x0, y - height, x1, y - height * 0.1, label, body)
        rows = 1 if label == "truck" else 2
        for r in range(rows):
            top = y - height * (0.9 - 0.35 * r)
            c.rect(x0 + width * 0.08, top, x1 - width * 0.08, top + height * 0.18, None,
                   c.colour(s.window_colour, 6.0))
    wheel = max(1.0, height * 0.14)
    for wx in (x0 + width * 0.18, x1 - width * 0.18):
        c.ellipse(wx, y - wheel, wheel * 0.8, wheel, label, (20, 20, 22))
    # Tail lights: colour only.
    light = max(1.0, width * 0.05)
    c.rect(x0 + light, y - height * 0.5, x0 + 3 * light, y - height * 0.4, None, (200, 30, 25))
    c.rect(x1 - 3 * light, y - height * 0.5, x1 - light, y - height * 0.4, None, (200, 30, 25))


def _draw_person(c: _Canvas, x, y, scale, label="person") -> float:
    """Legs, torso and head standing at (x, y); returns the figure's height."""
    s, rng = c.style, c.rng
    height = scale * rng.uniform(0.2, 0.28)
    width = height * 0.28
    clothes = c.colour(s.clothing_colours[rng.integers(len(s.clothing_colours))])
    trousers = c.colour(s.clothing_colours[rng.integers(len(s.clothing_colours))])
    c.rect(x - width * 0.4, y - height * 0.5, x + width * 0.4, y, label, trousers)
    c.rect(x - width / 2, y - height * 0.85, x + width / 2, y - height * 0.45, label, clothes)
    c.ellipse(x, y - height * 0.92, width * 0.3, height * 0.09, label, c.colour(s.colours["skin"]))
    return height


def _draw_rider(c: _Canvas, x, y, scale) -> None:
    s, rng = c.style, c.rng
    vehicle = "motorcycle" if rng.random() < 0.4 else "bicycle"
    length = scale * rng.uniform(0.14, 0.2)
    wheel = length * 0.28
    frame = c.colour(s.colours[vehicle])
    for wx in (x - length / 2 + wheel, x + length / 2 - wheel):
        c.ellipse(wx, y - wheel, wheel, wheel, vehicle, (25, 25, 28))
        c.ellipse(wx, y - wheel, wheel * 0.6, wheel * 0.6, None, frame)
    if vehicle == "motorcycle":
        c.rect(x - length * 0.3, y - wheel * 2.4, x + length * 0.3, y - wheel * 0.8, vehicle, frame)
    else:
        c.line((x - length / 2 + wheel, y - wheel), (x, y - wheel * 2.2), max(1, wheel * 0.25), vehicle, frame)
        c.line((x + length / 2 - wheel, y - wheel), (x, y - wheel * 2.2), max(1, wheel * 0.25), vehicle, frame)
    _draw_person(c, x, y - wheel * 1.6, scale * 0.8, "rider")


def _draw_pole(c: _Canvas, x, y, scale) -> None:
    s, rng = c.style, c.rng
    height = scale * rng.uniform(0.7, 1.1)
    width = max(1.0, height * 0.025)
    c.rect(x - width / 2, y - height, x + width / 2, y, "pole", c.colour(s.colours["pole"]))
    top = y - height
    kind = rng.random()
    if kind < 0.45:
        size = height * rng.uniform(0.1, 0.16)
        sign = c.colour(s.colours["traffic sign"])
        if rng.random() < 0.5:
            c.ellipse(x, top + size, size / 2, size / 2, "traffic sign", sign)
        else:
            c.rect(x - size / 2, top + size * 0.4, x + size / 2, top + size * 1.4, "traffic sign", sign)
    elif kind < 0.85:
        lw, lh = height * 0.07, height * 0.2
        c.rect(x - lw / 2, top, x + lw / 2, top + lh, "traffic light", c.colour(s.colours["traffic light"]))
        lamp = [(220, 40, 30), (230, 170, 30), (40, 200, 80)][rng.integers(3)]
        c.ellipse(x, top + lh * (0.2 + 0.3 * rng.integers(3)), lw * 0.3, lw * 0.3, None, lamp)


def _draw_tree(c: _Canvas, x, y, scale) -> None:
    s, rng = c.style, c.rng
    height = scale * rng.uniform(0.5, 0.9)
    trunk = max(1.0, height * 0.05)
    c.rect(x - trunk / 2, y - height * 0.6, x + trunk / 2, y, "vegetation", c.colour((90, 70, 50)))
    c.ellipse(x, y - height * 0.7, height * rng.uniform(0.2, 0.35), height * 0.3, "vegetation",
              c.colour(s.colours["vegetation"]))


def _draw_objects(c: _Canvas, st: _Street) -> None:
    """Vehicles, people, poles and trees, painted far to near so nearer ones occlude."""
    s, rng = c.style, c.rng
    objects: List[Tuple[float, float, float, str]] = []

    def add(kind: str, count_range: Tuple[int, int], where: str) -> None:
        for _ in range(rng.integers(count_range[0], count_range[1] + 1)):
            x, y, scale = _place(c, st, where)
            objects.append((y, x, scale, kind))

    add("car", s.cars, "road")
    for _ in range(rng.integers(s.big_vehicles[0], s.big_vehicles[1] + 1)):
        x, y, scale = _place(c, st, "road")
        objects.append((y, x, scale, "truck" if rng.random() < 0.5 else "bus"))
    add("person", s.people, "sidewalk")
    add("rider", s.riders, "road")
    add("pole", s.poles, "sidewalk")
    add("tree", s.trees, "sidewalk")
    add("static", (0, 1), "sidewalk")
    for y, x, scale, kind in sorted(objects):
        if kind in ("car", "truck", "bus"):
            _draw_car(c, x, y, scale, kind)
        elif kind == "person":
            _draw_person(c, x, y, scale)
        elif kind == "rider":
            _draw_rider(c, x, y, scale)
        elif kind == "pole":
            _draw_pole(c, x, y, scale)
        elif kind == "tree":
            _draw_tree(c, x, y, scale)
        else:  # a bin or crate: label id 4 "static", ignored by the 19 classes
            size = scale * 0.06
            c.rect(x - size, y - size * 1.5, x + size, y, "static", c.colour(s.colours["static"]))


def _draw_train(c: _Canvas, st: _Street) -> None:
    """A tram crossing the far end of the street."""
    s, rng = c.style, c.rng
    y = st.horizon + (c.h - st.horizon) * rng.uniform(0.05, 0.2)
    scale = np.subtract(*st.road_edges(y)[::-1])
    height = max(4.0, scale * 0.5)
    x0 = rng.uniform(-0.2, 0.3) * c.w
    x1 = x0 + c.w * rng.uniform(0.4, 0.8)
    c.rect(x0, y - height, x1, y, "train", c.colour(s.colours["train"]))
    c.rect(x0, y - height * 0.8, x1, y - height * 0.55, None, c.colour(s.window_colour, 6.0))


def _draw_ego_vehicle(c: _Canvas) -> None:
    """The hood of the recording car along the bottom (label id 1, ignored), as in Cityscapes."""
    depth = c.h * c.rng.uniform(0.06, 0.12)
    c.ellipse(c.w / 2, c.h + depth * 0.6, c.w * 0.75, depth * 1.6, "ego vehicle", c.colour((22, 24, 28), 4.0))


def _apply_style(rgb: np.ndarray, ids: np.ndarray, rng: np.random.Generator, s: SceneStyle) -> np.ndarray:
    """Texture, colour, illumination, blur and sensor noise of the domain."""
    h, w = ids.shape
    img = rgb.astype(np.float32)
    grain_by_id = np.zeros(256, np.float32)
    for name, amplitude in s.grain.items():
        grain_by_id[ID[name]] = amplitude
    img += (grain_by_id[ids] * rng.standard_normal((h, w), dtype=np.float32))[..., None]
    # Saturation, tint and brightness together are one 3x3 colour matrix.
    colour = (s.saturation * np.eye(3) + (1.0 - s.saturation) / 3.0) * np.asarray(s.tint)[:, None]
    img = cv2.transform(img, (colour * rng.uniform(*s.brightness)).astype(np.float32))
    # Illumination per pixel: low-frequency stains, a left-right ramp, vignetting.
    stains = rng.standard_normal((h // 8 + 2, w // 8 + 2), dtype=np.float32)
    light = 1.0 + s.texture * cv2.resize(stains, (w, h), interpolation=cv2.INTER_CUBIC)
    xs = np.linspace(-1.0, 1.0, w, dtype=np.float32)[None, :]
    ys = np.linspace(-1.0, 1.0, h, dtype=np.float32)[:, None]
    light *= (1.0 + s.shading * rng.choice((-1.0, 1.0)) * xs / 2) * (1.0 - s.vignette * (xs**2 + ys**2) / 2)
    img *= light[..., None]
    gamma_lut = (255.0 * (np.arange(256) / 255.0) ** rng.uniform(*s.gamma)).astype(np.float32)
    img = cv2.LUT(np.clip(img + 0.5, 0, 255).astype(np.uint8), gamma_lut)
    if s.blur > 0:
        img = cv2.GaussianBlur(img, (0, 0), s.blur * w / 512)
    img += s.sensor_noise * rng.standard_normal(img.shape, dtype=np.float32)
    return (np.clip(img, 0, 255) + 0.5).astype(np.uint8)


def render_scene(seed: Sequence[int], size: Tuple[int, int], style: SceneStyle) -> Tuple[np.ndarray, np.ndarray]:
    """One street scene: (RGB uint8 (H, W, 3), Cityscapes label ids uint8 (H, W)), a function of the seed."""
    rng = np.random.default_rng(list(seed))
    c = _Canvas(size[0], size[1], rng, style)
    street = _Street(c)
    _draw_ground(c, street)
    _draw_roadside(c, street)
    if rng.random() < style.train:
        _draw_train(c, street)
    _draw_objects(c, street)
    if rng.random() < style.ego_vehicle:
        _draw_ego_vehicle(c)
    return _apply_style(c.rgb, c.ids, rng, style), c.ids


# ---------------------------------------------------------------------------------------------
# Writing the sets in the real formats

NUM_SOURCE, NUM_TARGET_TRAIN, NUM_TARGET_VAL = 500, 500, 100
_PART_CODES = {"source": 0, "train": 1, "val": 2}


def default_cache_root() -> str:
    """``$ADVENT_FAST_DATA`` if set, else ``~/.cache/advent_fast/embedded-v1``.

    The sets inside are named after GENERATOR_VERSION, so a changed generator never reuses them.
    """
    default = os.path.join(os.path.expanduser("~"), ".cache", "advent_fast", "embedded-v1")
    return os.environ.get("ADVENT_FAST_DATA") or default


def _cityscapes_stem(index: int, count: int, cities: Sequence[str]) -> Tuple[str, str]:
    city = cities[index * len(cities) // count]
    return city, f"{city}_{index:06d}_000019"


def _write(path: str, ok: bool) -> None:
    if not ok:
        raise OSError(f"could not write {path}")


def _render_and_write(task: Tuple[str, int, int, int, str]) -> None:
    """Render image ``index`` of ``part`` and write it (and its label) under ``out_dir``."""
    part, seed, index, count, out_dir = task
    # Huffman-only coding: noisy photos compress as well as with filtering, and faster.
    png = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY]
    if part == "source":
        rgb, ids = render_scene((seed, _PART_CODES[part], index), SOURCE_SIZE, SOURCE_STYLE)
        name = f"{index + 1:05d}.png"
        image_path = os.path.join(out_dir, "gta5", "images", name)
        _write(image_path, cv2.imwrite(image_path, rgb[:, :, ::-1], png))
        label = Image.fromarray(ids)
        label.putpalette(label_id_palette())  # an 8-bit paletted PNG: index = label id, as in GTA5
        label.save(os.path.join(out_dir, "gta5", "labels", name), compress_level=1)
        return
    cities = TRAIN_CITIES if part == "train" else VAL_CITIES
    city, stem = _cityscapes_stem(index, count, cities)
    rgb, ids = render_scene((seed, _PART_CODES[part], index), TARGET_NATIVE_SIZE, TARGET_STYLE)
    image_path = os.path.join(out_dir, "cityscapes", "leftImg8bit", part, city, f"{stem}_leftImg8bit.png")
    _write(image_path, cv2.imwrite(image_path, rgb[:, :, ::-1], png))
    if part == "val":  # target training must work without labels: the train split has none
        label_path = os.path.join(out_dir, "cityscapes", "gtFine", part, city, f"{stem}_gtFine_labelIds.png")
        _write(label_path, cv2.imwrite(label_path, ids, [cv2.IMWRITE_PNG_COMPRESSION, 1]))


def _tasks(out_dir: str, seed: int, counts: Sequence[int]) -> List[Tuple[str, int, int, int, str]]:
    return [
        (part, seed, i, count, out_dir)
        for part, count in zip(("source", "train", "val"), counts)
        for i in range(count)
    ]


def _image_folders(out_dir: str) -> List[str]:
    return [os.path.join(out_dir, "gta5", "images")] + [
        os.path.join(out_dir, "cityscapes", "leftImg8bit", split, city)
        for split, cities in (("train", TRAIN_CITIES), ("val", VAL_CITIES))
        for city in cities
    ]


def generate_embedded_data(
    out_dir: str,
    seed: int = 0,
    num_source: int = NUM_SOURCE,
    num_target_train: int = NUM_TARGET_TRAIN,
    num_target_val: int = NUM_TARGET_VAL,
    workers: Optional[int] = None,
    progress: bool = True,
) -> None:
    """Write the source (GTA5 layout) and target (Cityscapes layout) sets into ``out_dir``.

    With several workers, each is a fresh ``python -m advent_fast.data.embedded`` process writing
    every workers-th image: unlike a multiprocessing pool this needs no ``__main__`` guard in the
    caller's script and inherits none of its threads (torch, OpenCV).
    """
    from tqdm import tqdm

    folders = _image_folders(out_dir) + [os.path.join(out_dir, "gta5", "labels")]
    folders += [os.path.join(out_dir, "cityscapes", "gtFine", "val", c) for c in VAL_CITIES]
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
    counts = (num_source, num_target_train, num_target_val)
    tasks = _tasks(out_dir, seed, counts)
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    bar = tqdm(total=len(tasks), desc="embedded data", unit="img", disable=not progress)
    try:
        if workers <= 1:
            for task in tasks:
                _render_and_write(task)
                bar.update()
        else:
            _run_worker_processes(out_dir, seed, counts, workers, bar)
    finally:
        bar.close()


def _run_worker_processes(out_dir: str, seed: int, counts: Sequence[int], workers: int, bar) -> None:
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p))
    command = [sys.executable, "-m", "advent_fast.data.embedded", "--out", out_dir, "--seed", str(seed),
               "--counts", *map(str, counts), "--shard"]
    logs = [tempfile.TemporaryFile() for _ in range(workers)]
    procs = [subprocess.Popen(command + [str(k), str(workers)], env=env, stdout=subprocess.DEVNULL, stderr=log)
             for k, log in enumerate(logs)]
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(0.25)
            bar.update(sum(len(os.listdir(f)) for f in _image_folders(out_dir)) - bar.n)
        for p, log in zip(procs, logs):
            if p.returncode != 0:
                log.seek(0)
                message = log.read().decode(errors="replace").strip().splitlines()[-20:]
                raise RuntimeError(f"embedded data worker failed (exit {p.returncode}):\n" + "\n".join(message))
        bar.update(bar.total - bar.n)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()


def ensure_embedded_data(
    root: Optional[str] = None,
    seed: int = 0,
    *,
    num_source: int = NUM_SOURCE,
    num_target_train: int = NUM_TARGET_TRAIN,
    num_target_val: int = NUM_TARGET_VAL,
    workers: Optional[int] = None,
    progress: bool = True,
) -> EmbeddedData:
    """The embedded sets under ``root`` (default :func:`default_cache_root`), generated once.

    Generation writes into a temporary folder that is renamed into place when complete, so an
    interrupted run leaves nothing half-written and concurrent callers (e.g. DDP ranks) agree.
    """
    cache_root = os.path.abspath(root or default_cache_root())
    name = f"v{GENERATOR_VERSION}-seed{seed}-{num_source}-{num_target_train}-{num_target_val}"
    final = os.path.join(cache_root, name)
    manifest = os.path.join(final, "manifest.json")
    if not os.path.isfile(manifest):
        os.makedirs(cache_root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=cache_root)
        try:
            start = time.perf_counter()
            generate_embedded_data(tmp, seed, num_source, num_target_train, num_target_val, workers, progress)
            info = {
                "generator_version": GENERATOR_VERSION, "seed": seed, "num_source": num_source,
                "num_target_train": num_target_train, "num_target_val": num_target_val,
                "source_size": SOURCE_SIZE, "target_native_size": TARGET_NATIVE_SIZE,
                "seconds": round(time.perf_counter() - start, 2),
            }
            with open(os.path.join(tmp, "manifest.json"), "w") as f:
                json.dump(info, f, indent=1)
            os.chmod(tmp, 0o755)
            try:
                os.rename(tmp, final)
            except OSError:
                if not os.path.isfile(manifest):  # not a concurrent generator that finished first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return EmbeddedData(final, os.path.join(final, "gta5"), os.path.join(final, "cityscapes"))


def main(argv: Optional[Sequence[str]] = None) -> EmbeddedData:
    """``python -m advent_fast.data.embedded``: generate (or find) the embedded sets and print where."""
    parser = argparse.ArgumentParser(prog="python -m advent_fast.data.embedded", description=main.__doc__)
    parser.add_argument("--root", help="cache root (default: $ADVENT_FAST_DATA or ~/.cache/advent_fast/embedded-v1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--counts", type=int, nargs=3, default=(NUM_SOURCE, NUM_TARGET_TRAIN, NUM_TARGET_VAL),
                        metavar=("SOURCE", "TARGET_TRAIN", "TARGET_VAL"))
    parser.add_argument("--workers", type=int, help="processes (default: one per core, at most 8)")
    # A worker of generate_embedded_data: write images k, k + n, ... into --out.
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--shard", type=int, nargs=2, metavar=("K", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.shard is not None:
        cv2.setNumThreads(1)  # one process per core already
        k, n = args.shard
        for task in _tasks(args.out, args.seed, args.counts)[k::n]:
            _render_and_write(task)
        return None
    data = ensure_embedded_data(args.root, args.seed, num_source=args.counts[0], num_target_train=args.counts[1],
                                num_target_val=args.counts[2], workers=args.workers)
    print(f"source (GTA5 layout):       {data.source_root}\ntarget (Cityscapes layout): {data.target_root}")
    return data


if __name__ == "__main__":
    main()
