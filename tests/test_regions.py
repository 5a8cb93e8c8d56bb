"""Object regions: boxes become a few image tokens, never (almost) the whole image.

A region covering almost every image token would make object->question equal image->question:
Zhang et al.'s object knockout would silently repeat the image knockout. CLEVR gives object
centres, and the box around one must follow the size of the image file.
"""

from __future__ import annotations

import json

import layouts
import pytest

import vlmtrace as vt
from vlmtrace.data.loaders import load_clevr
from vlmtrace.data.loaders.clevr import OBJECT_RADIUS
from vlmtrace.data.preparation import fix_for, prepare
from vlmtrace.data.regions import (
    MAX_REGION_SHARE,
    TOO_LARGE,
    RegionTooLargeError,
    cell_positions,
    region_tokens,
)
from vlmtrace.engine.corruptions import clean_side
from vlmtrace.engine.inputs import scored_answer_ids

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # the real words' answers are cut


@pytest.fixture(scope="module")
def llava() -> vt.VLM:
    return vt.load("shapes-llava")  # 32 px images in 8 px patches: a 4 x 4 grid of image tokens


@pytest.fixture(scope="module")
def scene(llava) -> vt.Sample:
    from vlmtrace.data import synthetic_samples

    return synthetic_samples(llava, "fact", 1, seed=0)[0]


def prompt_segments(llava, sample):
    answer = scored_answer_ids(llava, sample.prompt, sample.answer, whole=False)
    return clean_side(llava, sample, answer).prompt


def image_positions(llava, sample) -> list[int]:
    ids = llava.processor(text=[sample.prompt], images=[sample.image])["input_ids"][0]
    image_token = llava.tokenizer.convert_tokens_to_ids("<image>")
    return [i for i, t in enumerate(ids) if t == image_token]


def test_cells_of_a_region_map_to_the_image_tokens_in_row_major_order(llava, scene):
    segments = prompt_segments(llava, scene)
    image = image_positions(llava, scene)
    assert cell_positions([(0, 1), (2, 3)], 4, segments) == [image[1], image[11]]


def test_a_region_covering_more_than_the_maximum_share_of_image_tokens_is_an_error(llava, scene):
    segments = prompt_segments(llava, scene)
    cells = [(r, c) for r in range(4) for c in range(4)]
    assert MAX_REGION_SHARE == 0.9 and len(cell_positions(cells[:14], 4, segments)) == 14  # 88 %
    refused = r"covers 15 of the 16 image tokens \(94%, above MAX_REGION_SHARE = 90%\)"
    with pytest.raises(RegionTooLargeError, match=refused):
        cell_positions(cells[:15], 4, segments, sample_id=scene.id)


def test_a_box_over_the_whole_image_is_refused_and_one_patch_is_kept(llava, scene):
    whole = scene.with_(meta={**scene.meta, "regions": [(0, 0, 32, 32)]})
    with pytest.raises(RegionTooLargeError, match="Give a tighter box"):
        region_tokens(llava, whole)
    one = scene.with_(meta={**scene.meta, "regions": [(17, 9, 23, 15)]})  # inside patch row 1, column 2
    assert region_tokens(llava, one) == ([1 * 4 + 2], 16)


def test_data_whose_objects_fill_the_image_are_left_out_naming_the_reason_and_the_fix(llava, tmp_path):
    root = layouts.gqa(tmp_path / "gqa")
    graphs = json.loads((root / "testdev_sceneGraphs.json").read_text())
    for image_id in ("n16000", "n16001", "n16002"):  # 64 x 48 images: boxes over all of them
        for found in graphs[image_id]["objects"].values():
            found.update(x=0, y=0, w=64, h=48)
    (root / "testdev_sceneGraphs.json").write_text(json.dumps(graphs))
    prepared = prepare(llava, root, n=7, regions=True, keep_wrong=True)
    assert prepared.left_out == {TOO_LARGE: ["gqa-2000000", "gqa-2000001", "gqa-2000002"]}
    assert fix_for(TOO_LARGE) in prepared.fixes()


def test_clevr_boxes_around_pixel_coords_follow_the_width_of_the_image_file(tmp_path):
    root = layouts.clevr(tmp_path / "CLEVR_v1.0")  # 96 x 64 images
    samples = load_clevr(root / "questions" / "CLEVR_val_questions.json", root / "images")
    x0, y0, x1, y1 = samples[0].meta["regions"][0]  # the red cube at pixel_coords (20, 30)
    assert samples[0].image.size == (96, 64) and OBJECT_RADIUS == 0.06
    assert (x0, y0, x1, y1) == pytest.approx((20 - 5.76, 30 - 5.76, 20 + 5.76, 30 + 5.76))
