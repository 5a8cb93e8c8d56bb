"""The files of a tiny example data set: small images and documents written as releases write them.

Every example layout draws its images with `image` (a coloured box on grey, a few hundred bytes as
JPEG) and writes JSON and CSV as the data sets' own tools do, so a loader reads an example exactly
as it reads the download.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from PIL import Image, ImageDraw

PLACES = ["city", "town", "land", "area", "spot"]  # same length: same byte count on the organisms
COLOURS = ["red", "blue", "green", "yellow", "purple", "brown", "gray", "cyan"]


def image(path: Path, seed: int, size: tuple[int, int] = (64, 48)) -> Path:
    """A small JPEG with a coloured box whose place and colour depend on `seed`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.new("RGB", size, (200, 200, 200))
    x, y = 4 + (seed * 7) % (size[0] - 20), 4 + (seed * 5) % (size[1] - 20)
    ImageDraw.Draw(picture).rectangle(
        [x, y, x + 14, y + 14], fill=(40 * seed % 255, 90, 200 - 20 * seed % 200)
    )
    picture.save(path, "JPEG")
    return path


def write_json(path: Path, document: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    """A CSV as pandas' to_csv writes one (what the seed repositories released)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path
