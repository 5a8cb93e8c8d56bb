"""Tiny datasets written in the published on-disk layouts, for end-to-end tests of `--data`.

Each writer lays out files exactly as the dataset's release unpacks them (names, folders, JSON
keys), with real-sounding questions and small images, and returns the path `--data` takes.
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


def clevr(root: Path) -> Path:
    """CLEVR_v1.0 val: questions/ with programs, scenes/ with objects, images/val/."""
    questions, scenes = [], []
    for i in range(12):  # colours the organisms know: phrases of one shape have one token count
        colour, shape = ("red", "blue", "green")[i % 3], CLEVR_SHAPES[(i // 3) % 3]
        filename = f"CLEVR_val_{i:06d}.png"
        image(root / "images" / "val" / filename, i, size=(96, 64))
        scenes.append(
            {
                "image_index": i,
                "image_filename": filename,
                "split": "val",
                "objects": [
                    clevr_object(colour, shape, "large", "rubber", [20 + 4 * i, 30, 10.5], [0.0, 0.0, 0.7]),
                    clevr_object("gray", "cube", "small", "metal", [80, 20, 12.0], [1.0, 1.0, 0.35]),
                ],
            }
        )
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
                "image_filename": filename,
                "question_family_index": 7,
                "split": "val",
                "answer": "large" if i % 2 else "small",
                "question": f"What size is the {colour} {shape}?",
            }
        )
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


def finecops(annotations: Path) -> Path:
    """FineCops-Ref in COCO format: ROOT/annotations/NAME.json, GQA images in ROOT/gqa, negative
    images in ROOT/images; each positive has a text negative (one word edited) and an image negative."""
    root = annotations.parent.parent
    entries, boxes = [], []
    for i in range(10):
        colour, other = COLOURS[i % 4], COLOURS[(i + 1) % 4]
        expression = f"the {colour} box on the left"
        image(root / "gqa" / f"{2370000 + i}.jpg", i)
        image(root / "images" / f"neg_{2370000 + i}.jpg", i + 3)
        for kind, entry_id, name, text in (
            (None, i, f"{2370000 + i}.jpg", expression),
            ("text", 100 + i, f"{2370000 + i}.jpg", f"the {other} box on the left"),
            ("image", 200 + i, f"neg_{2370000 + i}.jpg", expression),
        ):
            entries.append(
                {
                    "id": entry_id,
                    "file_name": name,
                    "caption": text,
                    "height": 48,
                    "width": 64,
                    "dataset_name": "FineCops-Ref",
                    "original_img_id": str(2370000 + i),
                }
            )
            annotation = {
                "id": entry_id,
                "image_id": entry_id,
                "bbox": [20, 10, 18, 16],
                "area": 288,
                "iscrowd": 0,
                "category_id": 1,
                "level": 1 + i % 3,
                "tuple_type": "1_hop",
            }
            if kind is not None:
                annotation.update(
                    {
                        "negative_type": "attribute",
                        "negative_level": 1,
                        "negative_cate": kind,
                        "positive_id": i,
                    }
                )
            boxes.append(annotation)
    write_json(
        annotations,
        {
            "info": {},
            "licenses": [],
            "images": entries,
            "annotations": boxes,
            "categories": [{"id": 1, "name": "object"}],
        },
    )
    return annotations


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    """A CSV as pandas' to_csv writes one (what the seed repositories released)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


# question, subject, main_entity, as in multimodal_known.csv; the last constraint is not in its question
BASU_ROWS = [
    ("This building is located in", "Space Needle", "This building"),
    ("This mountain is located in the continent of", "Vinson Massif", "This mountain"),
    ("This service is owned by", "Beats Music", "This service"),
    ("This company is owned by", "Audible.com", "This company"),
    ("This show premieres on", "The Big Bang Theory", "This show"),
    ("This application, a product created by", "MacApp", "This application,"),
    ("In this place, the language spoken is a mixture of", "Marshall Islands", "this place,"),
    ("The headquarter of this organization is in", "Army of the Guardians", "this organization"),
    ("This person was born in the city of", "Eavan Boland", "This person"),
    ("What type of hat is this gentleman wearing?", "Top hat", "this hat"),
]


def basu(folder: Path) -> Path:
    """Basu et al.'s data_constraints/multimodal_known.csv, images ./A photo of SUBJECT/Image_1.jpg."""
    rows = []
    for i, (question, subject, entity) in enumerate(BASU_ROWS):
        image(folder / f"A photo of {subject}" / "Image_1.jpg", i)
        rows.append([i, question, subject, entity, f"./A photo of {subject}"])
    return _write_csv(
        folder / "multimodal_known.csv", ["", "question", "subject", "main_entity", "image_url"], rows
    )


ZHANG_COLUMNS = [
    "question_id",
    "img_id",
    "question",
    "answer",
    "true option",
    "false option",
    "central object name",
    "central object id",
    "central object attributes",
    "central object question attribute",
    "all objects",
    "all objects attributes",
    "type_detailed",
    "type_semantic",
    "type_structural",
    "operations",
    "operation_1",
    "operation_2",
    "captions",
    "image_w",
    "image_h",
    "central object w",
    "central object h",
    "central object x",
    "central object y",
    "full answer",
]


def zhang_gqa(path: Path) -> Path:
    """Zhang et al.'s datasets/GQA_val_correct_question_with_choose_ChooseAttr.csv, GQA images/."""
    rows = []
    objects = ["jar", "floor", "grass", "camera", "kite", "shirt", "bus", "cup", "sign", "boat"]
    for i, name in enumerate(objects):
        image(path.parent / "images" / f"{2390560 + i}.jpg", i, size=(64, 48))
        true, false = COLOURS[i % 4], COLOURS[(i + 2) % 4]
        first, second = (true, false) if i % 2 else (false, true)
        operations = [
            {"operation": "select", "dependencies": [], "argument": f"{name} ({496168 + i})"},
            {"operation": "choose color", "dependencies": [0], "argument": f"{true}|{false}"},
        ]
        rows.append(
            [
                f"{171031170 + i:09d}",
                2390560 + i,
                f"Is the {name} {first} or {second}?",
                true,
                true,
                false,
                name,
                496168 + i,
                f"{true}, small",
                true,
                f"{name}, table",
                f"{true}, small, white",
                "chooseAttr",
                "attr",
                "choose",
                str(operations),
                str(["select", f"{name} ({496168 + i})"]),
                str(["choose color", f"{true}|{false}"]),
                f"a {true} {name}. a table.",
                64,
                48,
                16,
                12,
                14 + 2 * i,
                18,
                f"The {name} is {true}.",
            ]
        )
    return _write_csv(path, ZHANG_COLUMNS, rows)


def palit_coco_qa(path: Path) -> Path:
    """Palit et al.'s Datasets/color_coco_qa.csv, COCO train2014 images in images/ beside it."""
    rows = []
    for i, (thing, colour) in enumerate(
        [
            ("horses", "brown"),
            ("dog", "black"),
            ("sign", "red"),
            ("bus", "yellow"),
            ("cat", "gray"),
            ("umbrella", "blue"),
            ("train", "red"),
            ("sky", "blue"),
            ("car", "green"),
            ("kite", "yellow"),
        ]
    ):
        image_id = 23004 + 1000 * i
        image(path.parent / "images" / f"COCO_train2014_{image_id:012d}.jpg", i)
        rows.append([i, image_id, f"what is the color of the {thing}", colour])
    return _write_csv(path, ["", "train_image_id_count", "question_count", "answer_count"], rows)


def palit_clevr(path: Path) -> Path:
    """Palit et al.'s Datasets/clevr_vqa_dataset_3.csv, CLEVR val images in images/val/ beside it."""
    rows = []
    objects = [
        ("large red cylinder", "small green sphere"),
        ("large green cylinder", "small cyan sphere"),
        ("small purple sphere", "large yellow cube"),
    ]
    for i, (a, b) in enumerate(objects):
        image_id = f"CLEVR_val_{145 + i:06d}"
        image(path.parent / "images" / "val" / f"{image_id}.png", i, size=(96, 64))
        questions = [
            {"question": f"Is the {x} {relation} the {y}?", "answer": answer}
            for relation in ("right of", "behind")
            for x, y, answer in ((a, b, 1), (b, a, 0))
        ]
        rows.append([i, image_id, str(questions)])
    return _write_csv(path, ["", "Image_IDs", "Questions_Answers"], rows)


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


# --- NOTICE's semantic image pairs and the seed's proposed data sets ----------------------------------------

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
    return _write_csv(path, header, rows)


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
        filename = f"CLEVR_val_{i:06d}.png"
        image(root / "images" / "val" / filename, i, size=(96, 64))
        scenes.append(
            {
                "image_index": i,
                "image_filename": filename,
                "split": "val",
                "objects": [clevr_object(colour, shape, "large", material, [40, 30, 10.5], [0.0, 0.0, 0.7])],
            }
        )
    write_json(root / "scenes" / "CLEVR_val_scenes.json", {"info": {"split": "val"}, "scenes": scenes})
    return root
