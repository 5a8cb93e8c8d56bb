"""COCO images by image id, wherever a download put them: VQA v2 and COCO-QA both name COCO images.

Releases name the files differently (COCO_val2014_{id:012d}.jpg in 2014, {id:012d}.jpg in 2017)
and unpack them flat or into a folder per split, so a loader cannot build the path from the id.
`CocoImages` lists the image folder and the folders inside it once, on the first lookup.

    images = CocoImages(Path("coco"), "val2014")  # prefers COCO_val2014_ when an id is found twice
    images.path(262148)                            # coco/val2014/COCO_val2014_000000262148.jpg
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_COCO_IMAGE = re.compile(r"^(?:COCO_(\w+?)_)?(\d{12})\.(?:jpg|jpeg|png)$", re.IGNORECASE)


class CocoImages:
    """COCO images by id, whichever split prefix (COCO_val2014_) or subfolder (val2014/) they have."""

    def __init__(self, image_dir: Path, subtype: str | None):
        self.image_dir = image_dir
        self.subtype = subtype  # the questions' split: preferred when an id is found twice
        self._paths: dict[int, Path] | None = None

    def path(self, image_id: int) -> Path:
        """The image's file; where it would be if it is missing, for the error message."""
        if self._paths is None:
            self._paths = self._scan()
        found = self._paths.get(image_id)
        if found is not None:
            return found
        name = f"COCO_{self.subtype}_{image_id:012d}.jpg" if self.subtype else f"{image_id:012d}.jpg"
        return self.image_dir / name

    def _scan(self) -> dict[int, Path]:
        # One listing per folder: a COCO split holds 40k-120k files, too many to probe name by name.
        paths: dict[int, Path] = {}
        folders = [self.image_dir]
        with os.scandir(self.image_dir) as entries:
            listed = sorted(entries, key=lambda entry: entry.name)
        folders += [Path(entry.path) for entry in listed if entry.is_dir()]
        for folder in folders:
            with os.scandir(folder) as entries:
                for entry in entries:
                    match = _COCO_IMAGE.match(entry.name)
                    if match is None:
                        continue
                    image_id = int(match.group(2))
                    if image_id not in paths or match.group(1) == self.subtype:
                        paths[image_id] = Path(entry.path)
        return paths
