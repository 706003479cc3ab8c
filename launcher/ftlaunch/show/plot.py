"""loss.png from metrics.jsonl, with nothing but the standard library.

A line chart of the training loss (blue) and, when the run evaluated, the eval
loss (orange, with a marker per evaluation): axes, tick marks and tick labels in
a built-in 3x5 pixel font. The PNG is written by hand (signature, IHDR, one
IDAT, IEND; 8-bit RGB, filter 0 on every row), so no plotting library is needed
on the training machines.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

from ftlaunch.run.directory import atomic_write, metrics_rows

WIDTH, HEIGHT = 640, 360
LEFT, RIGHT, TOP, BOTTOM = 60, 16, 14, 34  # margins around the plot area

BACKGROUND = (255, 255, 255)
AXIS = (60, 60, 60)
GRID = (232, 232, 232)
TRAIN = (31, 119, 180)
EVAL = (255, 127, 14)

# 3x5 glyphs, one string of 15 bits per character (rows top to bottom).
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001010010010", "8": "111101111101111",
    "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
}
_SCALE = 2  # each font pixel is 2x2 image pixels: a glyph is 6x10 with a 2-pixel gap


def read_points(metrics_jsonl: Path) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(train, eval) as sorted (step, loss) lists; unreadable or non-finite rows are skipped
    (a run killed mid-write can leave half a line), and a step logged twice keeps its last value."""
    train: dict[float, float] = {}
    evals: dict[float, float] = {}
    for row in metrics_rows(metrics_jsonl):
        if not _is_number(row.get("step")):
            continue
        for key, points in (("loss", train), ("eval_loss", evals)):
            if _is_number(row.get(key)):
                points[float(row["step"])] = float(row[key])
    return sorted(train.items()), sorted(evals.items())


def write_loss_png(metrics_jsonl: Path, out_png: Path) -> Path | None:
    """Draw the loss curve(s) of metrics.jsonl into out_png (written atomically).

    Returns out_png, or None, writing nothing, when fewer than 2 training-loss points
    were logged (a single point is no curve)."""
    train, evals = read_points(metrics_jsonl)
    if len(train) < 2:
        return None
    png = encode_png(WIDTH, HEIGHT, render(train, evals))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out_png, png)


def render(train: list[tuple[float, float]], evals: list[tuple[float, float]]) -> bytearray:
    """WIDTH x HEIGHT RGB pixels, row-major."""
    canvas = _Canvas(WIDTH, HEIGHT)
    points = train + evals
    x_ticks, x_lo, x_hi = _axis([p[0] for p in points], pad=0.0)
    y_ticks, y_lo, y_hi = _axis([p[1] for p in points], pad=0.05)
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT - 1, TOP, HEIGHT - BOTTOM - 1

    def px(step: float) -> int:
        return round(x0 + (step - x_lo) / (x_hi - x_lo) * (x1 - x0))

    def py(loss: float) -> int:
        return round(y1 - (loss - y_lo) / (y_hi - y_lo) * (y1 - y0))

    x_decimals, y_decimals = _decimals(x_ticks), _decimals(y_ticks)
    for value in y_ticks:
        y = py(value)
        canvas.hline(x0 + 1, x1, y, GRID)
        canvas.hline(x0 - 5, x0 - 1, y, AXIS)
        label = _format(value, y_decimals)
        canvas.text(label, x0 - 8 - _text_width(label), y - 5 * _SCALE // 2, AXIS)
    for value in x_ticks:
        x = px(value)
        canvas.vline(x, y0, y1 - 1, GRID)
        canvas.vline(x, y1 + 1, y1 + 5, AXIS)
        label = _format(value, x_decimals)
        canvas.text(label, x - _text_width(label) // 2, y1 + 9, AXIS)
    canvas.vline(x0, y0, y1, AXIS)
    canvas.hline(x0, x1, y1, AXIS)

    for series, colour in ((train, TRAIN), (evals, EVAL)):
        pixels = [(px(s), py(v)) for s, v in series]
        for a, b in zip(pixels, pixels[1:]):
            canvas.line(a, b, colour)
        if len(pixels) == 1 or series is evals:
            for x, y in pixels:
                canvas.rect(x - 2, y - 2, x + 2, y + 2, colour)
    return canvas.pixels


def encode_png(width: int, height: int, rgb: bytes | bytearray) -> bytes:
    """8-bit RGB PNG; every row uses filter type 0 (None)."""
    stride = width * 3
    raw = b"".join(b"\x00" + bytes(rgb[r * stride:(r + 1) * stride]) for r in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # depth 8, colour type RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


class _Canvas:
    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(BACKGROUND) * (width * height))

    def set(self, x: int, y: int, colour) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = (y * self.width + x) * 3
            self.pixels[i:i + 3] = bytes(colour)

    def hline(self, xa: int, xb: int, y: int, colour) -> None:
        for x in range(xa, xb + 1):
            self.set(x, y, colour)

    def vline(self, x: int, ya: int, yb: int, colour) -> None:
        for y in range(ya, yb + 1):
            self.set(x, y, colour)

    def rect(self, xa: int, ya: int, xb: int, yb: int, colour) -> None:
        for y in range(ya, yb + 1):
            self.hline(xa, xb, y, colour)

    def line(self, a: tuple[int, int], b: tuple[int, int], colour) -> None:
        """Bresenham, 2 pixels thick."""
        (xa, ya), (xb, yb) = a, b
        dx, dy = abs(xb - xa), -abs(yb - ya)
        sx, sy = (1 if xb >= xa else -1), (1 if yb >= ya else -1)
        err = dx + dy
        while True:
            self.rect(xa, ya, xa + 1, ya + 1, colour)
            if xa == xb and ya == yb:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                xa += sx
            if e2 <= dx:
                err += dx
                ya += sy

    def text(self, label: str, x: int, y: int, colour) -> None:
        for char in label:
            bits = _FONT.get(char)
            if bits is not None:
                for i, bit in enumerate(bits):
                    if bit == "1":
                        gx, gy = x + (i % 3) * _SCALE, y + (i // 3) * _SCALE
                        self.rect(gx, gy, gx + _SCALE - 1, gy + _SCALE - 1, colour)
            x += 4 * _SCALE


def _text_width(label: str) -> int:
    return len(label) * 4 * _SCALE - _SCALE


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _axis(values: list[float], pad: float) -> tuple[list[float], float, float]:
    """(tick values, low, high): about five 1-2-5 ticks over the data's range, padded."""
    lo, hi = min(values), max(values)
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):  # a flat curve still needs a range
        span = abs(hi) * 0.1 or 1.0
        lo, hi = lo - span, hi + span
    margin = (hi - lo) * pad
    lo, hi = lo - margin, hi + margin
    raw_step = (hi - lo) / 5
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw_step)
    first = math.ceil(lo / step - 1e-9)
    ticks = []
    k = first
    while k * step <= hi + 1e-9 * step:
        ticks.append(k * step)
        k += 1
    return ticks, lo, hi


def _decimals(ticks: list[float]) -> int:
    if len(ticks) < 2:
        return 0
    step = abs(ticks[1] - ticks[0])
    return max(0, -math.floor(math.log10(step) + 1e-9))


def _format(value: float, decimals: int) -> str:
    text = f"{value:.{decimals}f}"
    return "0" if text.strip("-0.") == "" else text
