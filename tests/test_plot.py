"""loss.png: a hand-written PNG, checked with a hand-written decoder."""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import pytest

from ftlaunch.show import plot


def decode_png(data: bytes) -> tuple[int, int, list[list[tuple[int, int, int]]]]:
    """(width, height, rows of RGB pixels) of an 8-bit RGB, non-interlaced PNG whose rows all
    use filter 0: the only kind write_loss_png makes, so any other filter byte fails here."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        pos += 12 + length
    kinds = [k for k, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(
        ">IIBBBBB", chunks[0][1])
    assert (depth, colour, compression, filtering, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = 1 + 3 * width
    assert len(raw) == height * stride
    rows = []
    for r in range(height):
        line = raw[r * stride:(r + 1) * stride]
        assert line[0] == 0, f"row {r} has filter type {line[0]}"
        rows.append([tuple(line[1 + 3 * x:4 + 3 * x]) for x in range(width)])
    return width, height, rows


def write_metrics(path: Path, train: list[tuple[int, float]], evals=()) -> Path:
    rows = [{"step": s, "loss": v, "learning_rate": 1e-4} for s, v in train]
    rows += [{"step": s, "eval_loss": v, "eval_perplexity": math.exp(v)} for s, v in evals]
    path.write_text("".join(json.dumps(r) + "\n" for r in sorted(rows, key=lambda r: r["step"])))
    return path


def colour_rows(rows, colour) -> dict[int, list[int]]:
    """column -> the rows where that colour is, for each column that has it."""
    found: dict[int, list[int]] = {}
    for y, row in enumerate(rows):
        for x, pixel in enumerate(row):
            if pixel == colour:
                found.setdefault(x, []).append(y)
    return found


def mean(values) -> float:
    return sum(values) / len(values)


@pytest.mark.parametrize("falling", [True, False])
def test_the_curve_is_drawn_where_the_loss_is(tmp_path, falling):
    train = [(s, (3.0 * math.exp(-s / 15) + 0.5) if falling else 0.5 + s / 20) for s in range(2, 61, 2)]
    evals = [(s, train[s // 2 - 1][1] + 0.2) for s in (20, 40, 60)]
    png = plot.write_loss_png(write_metrics(tmp_path / "metrics.jsonl", train, evals),
                              tmp_path / "loss.png")
    assert png == tmp_path / "loss.png"
    width, height, rows = decode_png(png.read_bytes())
    assert (width, height) == (plot.WIDTH, plot.HEIGHT)

    line = colour_rows(rows, plot.TRAIN)
    plot_width = plot.WIDTH - plot.LEFT - plot.RIGHT
    assert len(line) >= 0.9 * plot_width  # the train line runs across the plot
    columns = sorted(line)
    early = mean([y for x in columns[:20] for y in line[x]])
    late = mean([y for x in columns[-20:] for y in line[x]])
    # Image rows grow downwards: a falling loss starts high (small y) and ends low.
    assert (early < late - 50) if falling else (early > late + 50)

    assert colour_rows(rows, plot.EVAL)  # the eval series, in its own colour
    background = sum(pixel == plot.BACKGROUND for row in rows for pixel in row)
    assert background > 0.5 * width * height
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_without_eval_there_is_no_eval_colour(tmp_path):
    metrics = write_metrics(tmp_path / "m.jsonl", [(1, 2.0), (2, 1.5), (3, 1.4)])
    _, _, rows = decode_png(plot.write_loss_png(metrics, tmp_path / "loss.png").read_bytes())
    assert colour_rows(rows, plot.TRAIN) and not colour_rows(rows, plot.EVAL)


@pytest.mark.parametrize("train", [[], [(5, 1.0)]])
def test_fewer_than_two_points_write_nothing(tmp_path, train):
    metrics = write_metrics(tmp_path / "m.jsonl", train, evals=[(5, 1.1), (10, 1.0)])
    assert plot.write_loss_png(metrics, tmp_path / "loss.png") is None
    assert plot.write_loss_png(tmp_path / "missing.jsonl", tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()


def test_bad_lines_are_skipped_and_a_flat_loss_still_draws(tmp_path):
    metrics = tmp_path / "m.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": NaN}\n'
                       '{"step": 3, "loss": 2.0}\n[1, 2]\n{"loss": 9.0}\n{"step": 4, "lo')
    out = tmp_path / "sub" / "loss.png"
    out.parent.mkdir()
    out.write_bytes(b"an older plot")
    assert plot.write_loss_png(metrics, out) == out  # replaced
    _, _, rows = decode_png(out.read_bytes())
    line = colour_rows(rows, plot.TRAIN)
    ys = {y for x in line for y in line[x]}
    assert max(ys) - min(ys) <= 3  # a horizontal line, 2 pixels thick
    assert plot.read_points(metrics) == ([(1.0, 2.0), (3.0, 2.0)], [])
