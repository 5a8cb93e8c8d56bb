"""Write the walkthrough notebooks from this script, outputs stripped (kept in git as code).

    python notebooks/make_notebooks.py

Notebooks are generated so that their code lives in one reviewable place; CI executes them
(`tests/test_notebooks.py`).
"""

from __future__ import annotations

from pathlib import Path

import nbformat

HERE = Path(__file__).parent

LLAVA = [
    (
        "md",
        "# Causal tracing in a LLaVA-style VLM\n\nWe trace where `shapes-llava`, the trained "
        "LLaVA organism shipped with vlmtrace (CLIP tower, projector, 6-layer Llama), retrieves what it "
        "needs to answer multi-constraint questions such as *which city did the red shape represent in "
        "year 2006 ?* (Basu et al.), then how image information flows to the answer (Zhang et al.).",
    ),
    (
        "code",
        "import vlmtrace as vt\nfrom vlmtrace.data import synthetic_samples\n\n"
        'vlm = vt.load("shapes-llava")\nsamples = synthetic_samples(vlm, "multi", 4, seed=0)\n'
        "s = samples[0]\nprint(vlm)\nprint(s.prompt, '->', s.answer)\nprint(s.spans, s.replacements)\ns.image.resize((128, 128))",
    ),
    (
        "md",
        "## Corrupt the visual constraint, restore MLP and attention outputs\n\nEach cell of the grid is "
        "one row of a batched forward in one nnsight trace; the metric is computed inside the trace.",
    ),
    (
        "code",
        'ds = vt.patch(\n    vlm, samples,\n    corruption=vt.ReplaceSpan("visual"),\n'
        '    grid=vt.Grid(sites=("mlp", "attn"), windows=(1, 3), skip=("image",)),\n'
        "    metric=vt.Probability(),\n    progress=False,\n)\nds",
    ),
    (
        "code",
        'from vlmtrace.presentation.report import headline, segment_summary\nprint(headline(ds, sites=("mlp", "attn")))\n'
        'segment_summary(ds, "mlp")["mean"].sel(window=3).to_pandas().round(3)',
    ),
    (
        "code",
        "from vlmtrace.presentation import plots\nfrom vlmtrace.presentation.report import indirect_effect\n"
        "from IPython.display import Image\n"
        'path = plots.heatmap(indirect_effect(ds, "mlp").isel(sample=0).sel(window=3).dropna("position", how="all"),\n'
        '                     path="llava_mlp.png", title="MLP indirect effect, window 3")\nImage(str(path))',
    ),
    ("md", "## Attention knockout: which edges carry the image to the answer?"),
    (
        "code",
        'flow = vt.knockout(vlm, samples, blocks={"image->last": ("image", "last"),\n'
        '                                         "image->question": ("image", ("question", "visual", "textual"))},\n'
        "                   windows=(3,), progress=False)\n"
        'relative = (flow["knockout"] - flow["clean"]) / flow["clean"]\n'
        'relative.mean("sample").sel(window=3).to_pandas().round(3)',
    ),
    ("md", "## Save with provenance, read back unchanged"),
    (
        "code",
        'vt.save(ds, "llava_trace.zarr", overwrite=True)\nback = vt.open_result("llava_trace.zarr")\n'
        'assert back.identical(ds)\n{k: back.attrs[k] for k in ("model", "corruption", "metric", "version_nnsight")}',
    ),
]

BLIP = [
    (
        "md",
        "# Causal tracing in a BLIP-style (dual-stream) VLM\n\n`shapes-blip` is a trained "
        "`BlipForQuestionAnswering`: a ViT, a question encoder that cross-attends to the image, and an "
        "answer decoder. Following Palit et al. we add Gaussian noise to the image embeddings and "
        "restore each state of the question encoder and of the answer decoder; following NOTICE we then "
        "patch cross-attention heads under a semantic image pair.",
    ),
    (
        "code",
        "import vlmtrace as vt\nfrom vlmtrace.data import synthetic_samples\n\n"
        'vlm = vt.load("shapes-blip")\nsamples = synthetic_samples(vlm, "visual", 4, seed=0)\n'
        "print(vlm)\nprint(samples[0].prompt, '->', samples[0].answer)",
    ),
    (
        "code",
        'noise = vt.GaussianNoise("image", scale=3.0, samples=5, seed=0)\n'
        'encoder = vt.patch(vlm, samples, corruption=noise, grid=vt.Grid(sites=("block",), stack="encoder"), progress=False)\n'
        'decoder = vt.patch(vlm, samples, corruption=noise, grid=vt.Grid(sites=("block",), stack="decoder"), progress=False)\n'
        "print('clean P', float(encoder['clean'].mean()), 'noised P', float(encoder['corrupt'].mean()))\n"
        "(encoder['block'] - encoder['corrupt']).mean('sample').sel(window=1).to_pandas().round(3)",
    ),
    ("code", "(decoder['block'] - decoder['corrupt']).mean('sample').sel(window=1).to_pandas().round(3)"),
    ("md", "## Cross-attention heads under a semantic image pair (NOTICE)"),
    (
        "code",
        "heads = vt.patch(vlm, samples, corruption=vt.ImagePair(),\n"
        '                 grid=vt.Grid(sites=("cross_attn_head",), skip=("special",), positions="all"),\n'
        "                 metric=vt.LogitDiff(), progress=False)\n"
        'vt.normalised(heads, "cross_attn_head").mean("sample").squeeze().to_pandas().round(2)',
    ),
    (
        "code",
        "from vlmtrace.engine.attention import attention_pattern\nfrom vlmtrace.presentation import plots\nfrom IPython.display import Image\n"
        'att = attention_pattern(vlm, samples[0], kind="cross", query="last")\n'
        "weights = att.sel(layer=att.sizes['layer'] - 1).mean('head').values[1:]  # drop the CLS patch\n"
        'Image(str(plots.image_attention(samples[0].image, weights, grid=(4, 4), path="blip_attention.png",\n'
        '                                title="last question token over image patches")))',
    ),
]


def notebook(cells) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell(text) if kind == "md" else nbformat.v4.new_code_cell(text)
        for kind, text in cells
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


if __name__ == "__main__":
    for name, cells in (("llava_walkthrough", LLAVA), ("blip_walkthrough", BLIP)):
        nbformat.write(notebook(cells), HERE / f"{name}.ipynb")
        print(HERE / f"{name}.ipynb")
