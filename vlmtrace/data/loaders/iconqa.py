"""IconQA, read as published: a folder per problem, holding its `data.json` and `image.png`.

IconQA (Lu et al., NeurIPS 2021 Datasets) unpacks to `iconqa_data/iconqa/{split}/{task}/{pid}/`
with one problem per folder: `data.json` ({"question", "choices", "answer", "ques_type", "grade",
"label"}) and `image.png` (choose_img problems add `choice_0.png` ...). `answer` is the index of
the right choice for multiple-choice problems, the answer text for fill-in-the-blank ones.

    samples = load_iconqa("iconqa_data", split="test", n=100)

Two of the three tasks have text answers and are read: `choose_txt` (the question is followed by
its choices, "... Choices: certain, unlikely, impossible.", as multiple-choice VQA prompts show
them; the right choice is the answer, the first other choice the foil) and `fill_in_blank`.
`choose_img` answers are images, which a next-token metric cannot score, so it is not read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..sample import Sample
from .question import (
    DEFAULT_TEMPLATE,
    DatasetError,
    MissingImages,
    NotANumber,
    RawQuestion,
    SpanRequest,
    assemble,
    check_options,
    not_a_number,
    strict_json,
)

TASKS = ("choose_txt", "fill_in_blank")
"""The IconQA tasks with text answers, read in this order."""
SPLITS = ("test", "val", "train")


def iconqa_root(path: Path) -> Path | None:
    """The `iconqa/` folder (holding split folders) at or inside `path`, if it is an IconQA layout."""
    for root in (path / "iconqa", path):
        if any((root / split / task).is_dir() for split in SPLITS for task in (*TASKS, "choose_img")):
            return root
    return None


def load_iconqa(
    path: str | Path,
    *,
    split: str | None = None,
    tasks: Sequence[str] = TASKS,
    n: int | None = None,
    prompt_template: str = DEFAULT_TEMPLATE,
    spans: SpanRequest | None = None,
    missing_images: MissingImages = "raise",
) -> list[Sample]:
    """IconQA problems of `split` (default: the first of test, val, train present) and `tasks`.

    `path` is `iconqa_data` or `iconqa_data/iconqa`. Ids are "iconqa-{pid}"; `meta` keeps the
    task, choices, grade and skill label.
    """
    check_options(n, prompt_template, spans)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(
            f"IconQA tasks {unknown} cannot be read: choose from {list(TASKS)} (choose_img answers are "
            "images, which no next-token metric scores)."
        )
    path = Path(path)
    root = iconqa_root(path)
    if root is None:
        raise DatasetError(
            f"{path} is not IconQA as unpacked: expected iconqa/{{split}}/{{task}}/{{pid}}/data.json "
            "inside it (iconqa_data from the IconQA release)."
        )
    split = split or next(s for s in SPLITS if (root / s).is_dir())
    folders = [
        (task, folder)
        for task in tasks
        if (root / split / task).is_dir()
        for folder in sorted((root / split / task).iterdir(), key=_pid_order)
        if folder.is_dir()
    ]

    def read() -> Iterator[RawQuestion]:
        for task, folder in folders:
            problem = _problem(folder / "data.json")
            question, answer, foil = _text(problem, task, folder)
            yield RawQuestion(
                id=f"iconqa-{folder.name}",
                question=question,
                answer=answer,
                image=folder / "image.png",
                foil=foil,
                meta={
                    "question_id": folder.name,
                    "task": task,
                    "choices": problem.get("choices"),
                    "grade": problem.get("grade"),
                    "label": problem.get("label"),
                },
            )

    hint = "IconQA keeps each problem's image.png beside its data.json; re-extract iconqa_data."
    return assemble(
        read(),
        source=root / split,
        n=n,
        prompt_template=prompt_template,
        spans=spans,
        hint=hint,
        missing_images=missing_images,
    )


def _pid_order(folder: Path) -> tuple[int, str]:
    return (int(folder.name), "") if folder.name.isdigit() else (0, folder.name)


def _problem(path: Path) -> dict:
    try:
        problem = strict_json(path.read_text(encoding="utf-8"))
    except NotANumber as constant:
        raise not_a_number(str(path), str(constant)) from None
    except FileNotFoundError:
        raise DatasetError(
            f"IconQA problem folder {path.parent} has no data.json; re-extract iconqa_data."
        ) from None
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path} is not valid JSON ({error}).") from None
    if not isinstance(problem, dict) or "question" not in problem or "answer" not in problem:
        raise DatasetError(f"{path} is not an IconQA problem: expected an object with question and answer.")
    return problem


def _text(problem: dict, task: str, folder: Path) -> tuple[str, str, str | None]:
    """(question as shown, answer text, foil) of one problem."""
    question = str(problem["question"]).strip()
    if task == "fill_in_blank":
        return question, str(problem["answer"]).strip(), None
    choices = [str(c) for c in problem.get("choices") or []]
    index = problem["answer"]
    if not isinstance(index, int) or not 0 <= index < len(choices):
        raise DatasetError(
            f"{folder / 'data.json'}: answer {index!r} is not the index of one of its choices {choices}."
        )
    others = [c for i, c in enumerate(choices) if i != index]
    return f"{question} Choices: {', '.join(choices)}.", choices[index], others[0] if others else None
