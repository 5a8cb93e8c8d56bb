"""Semantic image pairs (NOTICE's SIP) and the seed's proposed data sets, in their published layouts:
SVO-Probes, MIT-States, Kaggle's facial-emotion-expressions, COOCO and ShapeWorld.

The words a pair differs by have equal lengths ("old" / "new", "happy" / "angry"), so the phrase STR
swaps keeps its token count on the organisms' byte-level vocabulary.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from .files import image, write_csv, write_json

SVO_ROWS = [  # (positive triplet, negative triplet, the role the negative changes): four-letter words
    ("girl,ride,bike", "girl,ride,boat", "obj"),
    ("lady,hold,ball", "lady,hold,kite", "obj"),
    ("baby,sits,sand", "baby,sits,snow", "obj"),
    ("duck,eats,corn", "duck,eats,bread", "obj"),
    ("girl,pets,lion", "girl,pets,wolf", "obj"),
    ("lady,ride,bike", "lady,walk,bike", "verb"),
]


def svo_probes(path: Path) -> Path:
    """google-deepmind/svo_probes' svo_probes.csv (pandas index first), images/{image_id}.jpg beside it."""
    header = ["", "sentence", "pos_triplet", "neg_triplet", "subj_neg", "verb_neg", "obj_neg"]
    header += ["pos_url", "neg_url", "pos_image_id", "neg_image_id"]
    rows = []
    for i, (positive, negative, role) in enumerate(SVO_ROWS):
        pos_id, neg_id = 5000 + 2 * i, 5001 + 2 * i
        image(path.parent / "images" / f"{pos_id}.jpg", 2 * i)
        image(path.parent / "images" / f"{neg_id}.jpg", 2 * i + 1)
        subject, verb, obj = positive.split(",")
        flags = [str(role == r) for r in ("subj", "verb", "obj")]
        rows.append(
            [i, f"A {subject} {verb}s the {obj}.", positive, negative, *flags,
             f"http://example.org/{pos_id}.jpg", f"http://example.org/{neg_id}.jpg", pos_id, neg_id]
        )  # fmt: skip
    return write_csv(path, header, rows)


def mit_states(root: Path) -> Path:
    """MIT-States' release_dataset/images/'adjective noun'/ (three-letter adjectives: STR lengths agree)."""
    states = ["old car", "new car", "wet car", "dry box", "wet box", "old box"]
    for i, state in enumerate(states):
        for k in range(2):
            image(root / "release_dataset" / "images" / state / f"image_{k}.jpg", 3 * i + k)
    (root / "release_dataset" / "images" / "car").mkdir()  # a noun-only folder: not a state, not read
    return root


def facial_expressions(root: Path) -> Path:
    """Kaggle's facial-emotion-expressions: images/{train,validation}/{emotion}/*.jpg (5-letter emotions)."""
    for split in ("train", "validation"):
        for e, emotion in enumerate(("angry", "happy")):
            for k in range(5):
                image(root / "images" / split / emotion / f"{k}.jpg", 5 * e + k)
    return root


COOCO_EDITS = [  # image, scene, target, replacement, level: three-letter names, equal STR lengths
    ("000000478726", "kitchen", "cup", "owl", "low"),
    ("000000478726", "kitchen", "cup", "pan", "high"),
    ("000000478726", "kitchen", "cup", "hat", "middle"),
    ("000000001234", "living_room", "toy", "elk", "low"),
    ("000000001234", "living_room", "toy", "fan", "high"),
    ("000000005678", "bedroom", "bed", "car", "low"),
    ("000000005678", "bedroom", "bed", "cot", "high"),
    ("000000005678", "bedroom", "bed", "rug", "middle"),
    ("000000009999", "street", "bus", "yak", "low"),
    ("000000009999", "street", "bus", "van", "high"),
    ("000000009999", "street", "bus", "bus", "same_target"),
]


def cooco(root: Path) -> Path:
    """COOCO as its generation code writes it: generated_images/{image}__{scene}__{target}__{replacement}
    _relscore_{level}.jpg, the COCO-Search18 originals {image}.jpg in images/."""
    for i, (name, scene, target, replacement, level) in enumerate(COOCO_EDITS):
        image(root / "images" / f"{name}.jpg", 100 + int(name) % 7)
        image(root / "generated_images" / f"{name}__{scene}__{target}__{replacement}_relscore_{level}.jpg", i)
    return root


SHAPEWORLD_WORLDS = [  # (caption, agreement, shape, colour of the one entity)
    ("there is a red square .", 1.0, "square", "red"),
    ("there is a red square .", 0.0, "circle", "blue"),
    ("there is a blue circle .", 1.0, "circle", "blue"),
    ("there is a blue circle .", 0.0, "square", "green"),
    ("a shape is a green triangle .", 1.0, "triangle", "green"),
    ("a shape is a green triangle .", 0.0, "triangle", "red"),
    ("there is a yellow cross .", 1.0, "cross", "yellow"),
    ("there is a yellow cross .", 0.0, "square", "yellow"),
    ("a square is red .", 1.0, "square", "red"),
    ("a square is red .", 0.0, "square", "blue"),
]


def shapeworld(root: Path) -> Path:
    """A ShapeWorld caption-agreement folder as generate.py -U extracts it: world-{n}.bmp, caption.txt,
    agreement.txt and (-M) world_model.json."""
    root.mkdir(parents=True, exist_ok=True)
    models = []
    for n, (_, _, shape, colour) in enumerate(SHAPEWORLD_WORLDS):
        picture = Image.new("RGB", (64, 64), (0, 0, 0))
        x0, y0 = 8 + 4 * n, 16 + 2 * n
        ImageDraw.Draw(picture).rectangle([x0, y0, x0 + 15, y0 + 15], fill=(200, 40 + 20 * n, 40))
        picture.save(root / f"world-{n}.bmp", "BMP")
        models.append(
            {
                "size": 64,
                "entities": [
                    {
                        "id": 0,
                        "shape": {"name": shape, "size": {"x": 0.25, "y": 0.25}},
                        "color": {"name": colour, "rgb": [1.0, 0.0, 0.0], "shade": 0.0},
                        "bounding_box": {
                            "topleft": {"x": x0 / 64, "y": y0 / 64},
                            "bottomright": {"x": (x0 + 16) / 64, "y": (y0 + 16) / 64},
                        },
                        "center": {"x": (x0 + 8) / 64, "y": (y0 + 8) / 64},
                    }
                ],
            }
        )
    (root / "caption.txt").write_text("".join(f"{c}\n" for c, _, _, _ in SHAPEWORLD_WORLDS))
    (root / "agreement.txt").write_text("".join(f"{a}\n" for _, a, _, _ in SHAPEWORLD_WORLDS))
    write_json(root / "world_model.json", models)
    return root
