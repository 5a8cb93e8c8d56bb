"""Question sets in their published layouts: VQA v2, GQA, CLEVR, COCO-QA, IconQA, CLEVR-Math, a table.

Each writer lays out files exactly as the release unpacks them (names, folders, JSON keys), with
real-sounding questions and small images, and returns the path `--data` takes. The questions are
chosen so that the README's commands keep samples on the shipped organisms: VQA v2's hold "this"
(`--span visual=@demonstrative`), CLEVR's name objects by colour and shape (`@object`), GQA's scene
graphs box the object each question asks about (object regions), the table's questions hold a
place and a year (`@demonstrative`, `@year`), and every answer recurs with a phrase of the same token
count, so STR finds a replacement with another answer (its answer becomes the foil).
"""

from __future__ import annotations

import json
from pathlib import Path

from .files import COLOURS, PLACES, image, write_json

VQA_QUESTIONS = [
    ("What continent is this place in?", "Europe"),
    ("What sport is this man playing?", "tennis"),
    ("What color is this bus?", "red"),
    ("What animal is this animal?", "dog"),
    ("What city is this place?", "Paris"),
    ("What sport is this woman playing?", "golf"),
    ("What color is this car?", "blue"),
    ("What room is this room?", "kitchen"),
    ("What continent is this place in?", "Asia"),
    ("What color is this bus?", "green"),
]


def vqa_v2(root: Path, *, pairs: bool = True) -> Path:
    """VQA v2 val2014: questions, annotations, complementary pairs, COCO_val2014_ images."""
    questions, annotations = [], []
    for i, (question, answer) in enumerate(VQA_QUESTIONS):
        image_id, question_id = 1000 + i, (1000 + i) * 1000
        image(root / "images" / f"COCO_val2014_{image_id:012d}.jpg", i)
        questions.append({"image_id": image_id, "question": question, "question_id": question_id})
        annotations.append(
            {
                "question_type": "what",
                "multiple_choice_answer": answer,
                "answers": [
                    {"answer": answer, "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)
                ],
                "image_id": image_id,
                "answer_type": "other",
                "question_id": question_id,
            }
        )
    common = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}}
    write_json(
        root / "v2_OpenEnded_mscoco_val2014_questions.json",
        {**common, "data_subtype": "val2014", "questions": questions},
    )
    write_json(
        root / "v2_mscoco_val2014_annotations.json",
        {**common, "data_subtype": "val2014", "annotations": annotations},
    )
    if pairs:  # same question, similar image, another answer
        ids = [q["question_id"] for q in questions]
        write_json(
            root / "v2_mscoco_val2014_complementary_pairs.json",
            [[ids[0], ids[8]], [ids[2], ids[9]], [ids[1], ids[5]], [ids[4], ids[7]], [ids[3], ids[6]]],
        )
    return root


def gqa(root: Path) -> Path:
    """GQA testdev: balanced questions keyed by id (with annotations) and scene graphs with boxes."""
    questions, graphs = {}, {}
    objects = ["bus", "car", "dog", "cat", "man", "tree", "sign", "horse", "boat", "bird"]
    for i, name in enumerate(objects):
        image_id = f"n{16000 + i}"
        image(root / "images" / f"{image_id}.jpg", i, size=(64, 48))
        colour = COLOURS[i % len(COLOURS)]
        questions[f"20{i:05d}"] = {
            "semanticStr": f"select: {name} ({i})->query: color",
            "semantic": [
                {"operation": "select", "dependencies": [], "argument": f"{name} ({i})"},
                {"operation": "query", "dependencies": [0], "argument": "color"},
            ],
            "entailed": [],
            "equivalent": [f"20{i:05d}"],
            "question": f"What color is the {name}?",
            "imageId": image_id,
            "isBalanced": True,
            "groups": {"global": "color", "local": "10q-color"},
            "answer": colour,
            "types": {"detailed": "objAttr", "semantic": "attr", "structural": "query"},
            "annotations": {"answer": {}, "question": {"4": str(i)}, "fullAnswer": {"1": str(i)}},
            "fullAnswer": f"The {name} is {colour}.",
        }
        graphs[image_id] = {
            "width": 64,
            "height": 48,
            "objects": {
                str(i): {
                    "name": name,
                    "x": 8 + i,
                    "y": 10,
                    "w": 20,
                    "h": 16,
                    "attributes": [colour],
                    "relations": [],
                }
            },
        }
    write_json(root / "testdev_balanced_questions.json", questions)
    write_json(root / "testdev_sceneGraphs.json", graphs)
    return root


CLEVR_SHAPES = ["cube", "sphere", "cylinder"]


def clevr_object(colour: str, shape: str, size: str, material: str, pixel: list, place: list) -> dict:
    """One object of a CLEVR scene file, as CLEVR's scenes JSON writes it."""
    return {
        "color": colour,
        "shape": shape,
        "size": size,
        "material": material,
        "pixel_coords": pixel,
        "3d_coords": place,
        "rotation": 0.0,
    }


def clevr_scene(images: Path, i: int, objects: list[dict]) -> dict:
    """Scene `i` of a CLEVR val split, as CLEVR's scenes JSON writes it; its image (96 x 64, drawn
    from `i`) is written into `images` under CLEVR's file name."""
    filename = f"CLEVR_val_{i:06d}.png"
    image(images / filename, i, size=(96, 64))
    return {"image_index": i, "image_filename": filename, "split": "val", "objects": objects}


def clevr(root: Path) -> Path:
    """CLEVR_v1.0 val: questions/ with programs, scenes/ with objects, images/val/.

    12 questions, each on a scene of two objects; then 12 scenes of one object that no question asks
    about (the concepts recipe builds its pairs from scenes)."""
    questions, scenes = [], []
    for i in range(12):  # colours the organisms know: phrases of one shape have one token count
        colour, shape = ("red", "blue", "green")[i % 3], CLEVR_SHAPES[(i // 3) % 3]
        objects = [
            clevr_object(colour, shape, "large", "rubber", [20 + 4 * i, 30, 10.5], [0.0, 0.0, 0.7]),
            clevr_object("gray", "cube", "small", "metal", [80, 20, 12.0], [1.0, 1.0, 0.35]),
        ]
        scene = clevr_scene(root / "images" / "val", i, objects)
        scenes.append(scene)
        questions.append(
            {
                "image_index": i,
                "program": [
                    {"inputs": [], "function": "scene", "value_inputs": []},
                    {"inputs": [0], "function": "filter_color", "value_inputs": [colour]},
                    {"inputs": [1], "function": "filter_shape", "value_inputs": [shape]},
                    {"inputs": [2], "function": "unique", "value_inputs": []},
                    {"inputs": [3], "function": "query_size", "value_inputs": []},
                ],
                "question_index": i,
                "image_filename": scene["image_filename"],
                "question_family_index": 7,
                "split": "val",
                "answer": "large" if i % 2 else "small",
                "question": f"What size is the {colour} {shape}?",
            }
        )
    # Scenes no question asks about, as in CLEVR's own files: one object each, every (colour, shape,
    # material) of red / blue, cylinder / cube / sphere, metal / rubber once, so that each member of the
    # concepts recipe's B_s and B_d sets has a scene (`vlmtrace recipe concepts --data CLEVR_v1.0/`).
    combinations = [(c, s, m) for c in ("red", "blue") for s in CLEVR_SHAPES for m in ("metal", "rubber")]
    for i, (colour, shape, material) in enumerate(combinations, start=len(scenes)):
        objects = [clevr_object(colour, shape, "large", material, [40, 30, 10.5], [0.0, 0.0, 0.7])]
        scenes.append(clevr_scene(root / "images" / "val", i, objects))
    write_json(
        root / "questions" / "CLEVR_val_questions.json", {"info": {"split": "val"}, "questions": questions}
    )
    write_json(root / "scenes" / "CLEVR_val_scenes.json", {"info": {"split": "val"}, "scenes": scenes})
    return root


def coco_qa(root: Path) -> Path:
    """COCO-QA test/: questions.txt, answers.txt, img_ids.txt, types.txt; COCO images."""
    rows = [
        ("what is the man riding", "horse", 0),
        ("what color is the bus", "red", 2),
        ("how many dogs are in the field", "two", 1),
        ("where is the cat sitting", "table", 3),
        ("what is on the plate", "pizza", 0),
        ("what color is the car", "blue", 2),
        ("how many birds are on the wire", "three", 1),
        ("what is the woman holding", "umbrella", 0),
        ("where is the boat", "water", 3),
    ]
    split = root / "test"
    split.mkdir(parents=True, exist_ok=True)
    for i in range(len(rows)):
        image(root / "images" / f"COCO_val2014_{2000 + i:012d}.jpg", i)
    (split / "questions.txt").write_text("".join(f"{q}\n" for q, _, _ in rows))
    (split / "answers.txt").write_text("".join(f"{a}\n" for _, a, _ in rows))
    (split / "img_ids.txt").write_text("".join(f"{2000 + i}\n" for i in range(len(rows))))
    (split / "types.txt").write_text("".join(f"{t}\n" for _, _, t in rows))
    return root


def table(root: Path) -> Path:
    """A JSONL table with real questions holding a visual and a textual constraint."""
    rows = []
    for i in range(10):
        image(root / f"img{i}.jpg", i)
        year = 2000 + i
        rows.append(
            {
                "image": f"img{i}.jpg",
                "question": f"Who directed a movie in this {PLACES[i % 5]} in {year}?",
                "answer": ["Nolan", "Lee", "Varda", "Kurosawa", "Bong"][i % 5],
            }
        )
    path = root / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def iconqa(root: Path) -> Path:
    """IconQA as iconqa_data unpacks: iconqa/test/{choose_txt,fill_in_blank,choose_img}/{pid}/."""
    split = root / "iconqa" / "test"
    choices = ["certain", "unlikely", "impossible", "probable"]
    for i in range(8):
        folder = split / "choose_txt" / str(100 + i)
        image(folder / "image.png", i)
        write_json(
            folder / "data.json",
            {
                "question": "How likely is it that you will pick a black one?",
                "choices": choices[: 2 + i % 3],
                "answer": i % 2,
                "ques_type": "choose_txt",
                "grade": "grade1",
                "label": "S2",
            },
        )
    for i in range(4):
        folder = split / "fill_in_blank" / str(200 + i)
        image(folder / "image.png", 10 + i)
        write_json(
            folder / "data.json",
            {
                "question": "How many dots are there?",
                "choices": None,
                "answer": str(3 + i),
                "ques_type": "fill_in_blank",
                "grade": "prek",
                "label": "S1",
            },
        )
    folder = split / "choose_img" / "300"  # answers are images: never read
    image(folder / "image.png", 20)
    image(folder / "choice_0.png", 21)
    write_json(
        folder / "data.json",
        {
            "question": "Which shape is a circle?",
            "choices": ["choice_0.png"],
            "answer": 0,
            "ques_type": "choose_img",
        },
    )
    return root


def clevr_math(root: Path) -> Path:
    """CLEVR-Math as clevr-math.zip unpacks: clevr-math-val.json; CLEVR images in CLEVR_v1.0/images/val/."""
    questions = []
    for i in range(12):
        colour, noun = ("red", "blue", "green")[i % 3], ("cubes", "spheres")[(i // 3) % 2]
        filename = f"CLEVR_val_{i:06d}.png"
        image(root / "CLEVR_v1.0" / "images" / "val" / filename, i, size=(96, 64))
        questions.append(
            {
                "split": "val",
                "image_index": i,
                "image_filename": filename,
                "question": f"Remove all {colour} {noun}. How many objects are left?",
                "answer": (i * 3) % 7,
                "template_filename": "subtraction.json",
                "question_family_index": 0,
            }
        )
    write_json(root / "clevr-math-val.json", {"info": {"split": "val"}, "questions": questions})
    return root
