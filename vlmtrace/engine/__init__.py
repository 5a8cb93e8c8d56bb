"""The engine: batched forwards with interventions, and the experiments built on them.

forward.py        one batched forward with many edits, scored inside one nnsight trace
layouts.py        how hooked tensors hold rows and positions: checked and applied here only
inputs.py         one sample encoded: a row of inputs, its segments, its answer ids
positions.py      segments: image, constraint spans, question, last, named not numbered
corruptions.py    how the corrupted run differs (ReplaceSpan, STR, GaussianNoise, ImagePair)
sites.py          the grid of cells: sites, layers, windows, positions, heads
metrics.py        what a row is scored by, inside the trace
planning.py       samples -> encoded pairs and cells (shared by patching and attribution)
sweep.py          activation patching over a grid, chunked, resumable: `vt.patch`
prefix_reuse.py   start each chunk where it first differs from the baseline rows
attribution.py    attribution patching (a gradient screen): `vt.attribute`
gradients.py      the traced forward and backward passes attribution estimates from
qk_fix.py         AtP*'s QK fix: the first attention softmax a patch meets, recomputed
screening.py      which cells to patch exactly, and how well estimates rank them
knockout.py       attention knockout: `vt.knockout`
attention.py      attention patterns (NOTICE)
invariants.py     the engine's invariants on any model: `vt.check`, and each sweep's self-check
editing/          MEMIT over contexts and MultEdit at the layers a trace located (`vt.edit`), and
                  their evaluation by the editing literature's probes (`editing.evaluate`)
"""
