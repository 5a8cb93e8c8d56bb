"""Tiny datasets written in the published on-disk layouts, for end-to-end tests of `--data`.

The writers of every layout the README uses ship with vlmtrace (`vlmtrace.data.examples`, which
`vlmtrace data example LAYOUT DIR` runs), so the tests and users write the same files. Here are the
variants only tests need: GQA's layout holding the organisms' own scenes (some mislabelled), COOCO's
per-scene layout, and CLEVR scenes for the concepts recipe.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from vlmtrace.data.examples.files import COLOURS, PLACES, image, write_csv, write_json
from vlmtrace.data.examples.image_pairs import (
    COOCO_EDITS,
    SHAPEWORLD_WORLDS,
    SVO_ROWS,
    cooco,
    facial_expressions,
    mit_states,
    shapeworld,
    svo_probes,
)
from vlmtrace.data.examples.question_sets import (
    CLEVR_SHAPES,
    VQA_QUESTIONS,
    clevr,
    clevr_math,
    clevr_object,
    clevr_scene,
    coco_qa,
    gqa,
    iconqa,
    table,
    vqa_v2,
)
from vlmtrace.data.examples.seed_papers import (
    BASU_ROWS,
    basu,
    finecops,
    palit_clevr,
    palit_coco_qa,
    zhang_gqa,
)

__all__ = [
    "BASU_ROWS",
    "CLEVR_SHAPES",
    "COLOURS",
    "COOCO_EDITS",
    "PLACES",
    "SHAPEWORLD_WORLDS",
    "SVO_ROWS",
    "VQA_QUESTIONS",
    "basu",
    "clevr",
    "clevr_concept_scenes",
    "clevr_math",
    "clevr_object",
    "coco_qa",
    "cooco",
    "cooco_by_scene",
    "facial_expressions",
    "finecops",
    "gqa",
    "gqa_shapes",
    "iconqa",
    "image",
    "mit_states",
    "palit_clevr",
    "palit_coco_qa",
    "shapeworld",
    "svo_probes",
    "table",
    "vqa_v2",
    "write_csv",
    "write_json",
    "zhang_gqa",
]

SHAPES_SIDE = 64  # the organisms' 32-px scenes drawn twice as large: a JPEG keeps their shapes


def _scene_jpeg(picture, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.resize((SHAPES_SIDE, SHAPES_SIDE), Image.NEAREST).save(path, "JPEG", quality=95)


def gqa_shapes(root: Path, *, n: int = 12, mislabelled: tuple[int, ...] = (0, 2)) -> Path:
    """GQA testdev as published, holding the organisms' own scenes and questions (which they answer).

    Unlike the real-word layouts above, whose answers the organisms never give, these show a run
    leaving out the samples the model gets wrong. Per scene, in file order: its fact question, the
    same question on its image pair (the selected shape's hidden attribute changed, so another city),
    and a multi-constraint question ("... in year 2006 ?"). The fact and multi-constraint questions
    of the scenes in `mislabelled` carry another city, as an annotation error would. Scene graphs box
    the selected shape, so object regions map to its patch.
    """
    from vlmtrace.data.drawing import GRID
    from vlmtrace.data.mascots import CITIES
    from vlmtrace.data.scenes import make_samples

    questions, graphs = {}, {}
    facts = make_samples("fact", n, seed=11, split="test")
    multis = make_samples("multi", n, seed=12, split="test")

    def add(key: str, sample, picture, answer: str) -> None:
        image_id = f"s{key}"
        _scene_jpeg(picture, root / "images" / f"{image_id}.jpg")
        text = sample.prompt.removeprefix("<image> ")
        questions[key] = {
            "question": text,
            "answer": answer,
            "imageId": image_id,
            "isBalanced": True,
            "types": {"detailed": "shapes", "semantic": "attr", "structural": "query"},
            "annotations": {"answer": {}, "question": {"1": "0"}, "fullAnswer": {}},
        }
        row, column = sample.meta["scene"][sample.meta["selected"]]["cell"]
        cell = SHAPES_SIDE // GRID  # the box: the selected shape's patch, 2 px in from its edges
        box = {"x": column * cell + 2, "y": row * cell + 2, "w": cell - 4, "h": cell - 4}
        graphs[image_id] = {
            "width": SHAPES_SIDE,
            "height": SHAPES_SIDE,
            "objects": {"0": {"name": "shape", **box}},
        }

    def label(sample, scene: int) -> str:  # another city than the scene's: an annotation error
        return next(c for c in CITIES if c != sample.answer) if scene in mislabelled else sample.answer

    for i, (fact, multi) in enumerate(zip(facts, multis, strict=True)):
        add(f"{i}0", fact, fact.image, label(fact, i))
        add(f"{i}1", fact, fact.image_pair, fact.meta["answers"]["image_pair"])
        add(f"{i}2", multi, multi.image, label(multi, i))
    write_json(root / "testdev_balanced_questions.json", questions)
    write_json(root / "testdev_sceneGraphs.json", graphs)
    return root


COOCO_BY_SCENE = [  # scene folder, image, target, its edits (replacement, level): underscores in names
    ("living_room", "000000004321", "teddy_bear", [("elk", "low"), ("fan", "high"), ("toy_car", "middle")]),
    (
        "kitchen",
        "000000008765",
        "cup",
        [("owl", "low"), ("pan", "high"), ("hat", "middle"), ("cup", "same_target")],
    ),
]


def cooco_by_scene(root: Path) -> Path:
    """COOCO as making_COOCO's utils_powerpaint.py writes it (the layout its filter_dataset.py reads):
    generated_images/{scene}/{image}_{scene}_{target}_original.jpg, ..._clean.jpg, and
    ..._{replacement}_relscore_{level}.jpg."""
    for s, (scene, name, target, edits) in enumerate(COOCO_BY_SCENE):
        folder = root / "generated_images" / scene
        image(folder / f"{name}_{scene}_{target}_original.jpg", 50 + s)
        image(folder / f"{name}_{scene}_{target}_clean.jpg", 60 + s)
        for e, (replacement, level) in enumerate(edits):
            image(folder / f"{name}_{scene}_{target}_{replacement}_relscore_{level}.jpg", 70 + 5 * s + e)
    return root


def clevr_concept_scenes(root: Path) -> Path:
    """CLEVR_v1.0 as unpacked, scenes only: scenes/CLEVR_val_scenes.json and images/val/, one object a
    scene, every (colour, shape, material) of red / blue, cylinder / cube / sphere, metal / rubber once:
    each member of the concepts' B_s and B_d sets has a scene."""
    scenes = []
    combinations = [
        (colour, shape, material)
        for colour in ("red", "blue")
        for shape in ("cylinder", "cube", "sphere")
        for material in ("metal", "rubber")
    ]
    for i, (colour, shape, material) in enumerate(combinations):
        objects = [clevr_object(colour, shape, "large", material, [40, 30, 10.5], [0.0, 0.0, 0.7])]
        scenes.append(clevr_scene(root / "images" / "val", i, objects))
    write_json(root / "scenes" / "CLEVR_val_scenes.json", {"info": {"split": "val"}, "scenes": scenes})
    return root
