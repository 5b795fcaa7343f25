"""A small line-chart writer to PNG with numpy + zlib only (matplotlib is not a project dependency).

Enough for "accuracy vs haystack length": log2 x axis, 0..100 % y axis, grid, lines with markers,
a legend and a title in a built-in 3x5 bitmap font (upper case, digits, a few signs)."""
from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np

_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", "%": "101001010100101", ".": "000000000000010",
    "-": "000000111000000", "(": "010100100100010", ")": "010001001001010", "=": "000111000111000",
    "/": "001001010100100", " ": "000000000000000", ":": "000010000010000", ",": "000000000010100",
    "A": "010101111101101", "B": "110101110101110", "C": "011100100100011", "D": "110101101101110",
    "E": "111100110100111", "F": "111100110100100", "G": "011100101101011", "H": "101101111101101",
    "I": "111010010010111", "J": "001001001101010", "K": "101101110101101", "L": "100100100100111",
    "M": "101111111101101", "N": "110101101101101", "O": "010101101101010", "P": "110101110100100",
    "Q": "010101101110011", "R": "110101110101101", "S": "011100010001110", "T": "111010010010010",
    "U": "101101101101111", "V": "101101101101010", "W": "101101111111101", "X": "101101010101101",
    "Y": "101101010010010", "Z": "111001010100111",
}

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


class Canvas:
    def __init__(self, width: int, height: int):
        self.px = np.full((height, width, 3), 255, dtype=np.uint8)

    def rect(self, x0: int, y0: int, x1: int, y1: int, colour: tuple[int, int, int]) -> None:
        h, w = self.px.shape[:2]
        x0, x1 = sorted((max(0, x0), min(w, x1)))
        y0, y1 = sorted((max(0, y0), min(h, y1)))
        self.px[y0:y1, x0:x1] = colour

    def line(self, x0: float, y0: float, x1: float, y1: float, colour, width: int = 2, dash: int = 0) -> None:
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        for i in range(n + 1):
            if dash and (i // dash) % 2 == 1:
                continue
            t = i / n
            x, y = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t
            self.rect(int(x - width / 2), int(y - width / 2), int(x - width / 2) + width, int(y - width / 2) + width, colour)

    def text(self, x: int, y: int, s: str, colour=(0, 0, 0), scale: int = 2) -> None:
        for ch in s.upper():
            glyph = _FONT.get(ch, _FONT[" "])
            for r in range(5):
                for c in range(3):
                    if glyph[r * 3 + c] == "1":
                        self.rect(x + c * scale, y + r * scale, x + (c + 1) * scale, y + (r + 1) * scale, colour)
            x += 4 * scale

    @staticmethod
    def text_width(s: str, scale: int = 2) -> int:
        return len(s) * 4 * scale - scale

    def save(self, path: str | Path) -> None:
        h, w = self.px.shape[:2]
        raw = b"".join(b"\x00" + self.px[r].tobytes() for r in range(h))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
        Path(path).write_bytes(png)


def accuracy_plot(path: str | Path, xs: list[float], series: list[tuple[str, list[float], bool]], title: str,
                  xlabel: str, width: int = 760, height: int = 460) -> None:
    """series: (label, accuracies in [0, 1] per x, dashed). x on a log2 axis."""
    cv = Canvas(width, height)
    left, right, top, bottom = 70, 20, 50, 60
    pw, ph = width - left - right, height - top - bottom
    lx = [math.log2(x) for x in xs]
    lo, hi = min(lx), max(lx) if max(lx) > min(lx) else min(lx) + 1

    def px(x: float) -> float:
        return left + (math.log2(x) - lo) / (hi - lo) * pw

    def py(y: float) -> float:
        return top + (1.0 - y) * ph

    for y in (0, 0.25, 0.5, 0.75, 1.0):
        cv.line(left, py(y), left + pw, py(y), (220, 220, 220), 1)
        label = f"{int(y * 100)}%"
        cv.text(left - 10 - cv.text_width(label), int(py(y)) - 5, label)
    for x in xs:
        cv.line(px(x), top, px(x), top + ph, (220, 220, 220), 1)
        label = f"{x:g}"
        cv.text(int(px(x)) - cv.text_width(label) // 2, top + ph + 10, label)
    cv.line(left, top + ph, left + pw, top + ph, (0, 0, 0), 2)
    cv.line(left, top, left, top + ph, (0, 0, 0), 2)
    cv.text(left + (pw - cv.text_width(xlabel)) // 2, height - 25, xlabel)
    cv.text((width - cv.text_width(title)) // 2, 15, title)
    for i, (label, ys, dashed) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        pts = [(px(x), py(y)) for x, y in zip(xs, ys)]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            cv.line(x0, y0, x1, y1, colour, 3, dash=8 if dashed else 0)
        for x, y in pts:
            cv.rect(int(x) - 4, int(y) - 4, int(x) + 5, int(y) + 5, colour)
        ly = top + 10 + i * 18
        cv.rect(left + pw - 250, ly, left + pw - 230, ly + 10, colour)
        cv.text(left + pw - 222, ly, label)
    cv.save(path)
