"""vlmtrace: causal interventions on vision-language models, batched in nnsight traces.

import vlmtrace as vt
vlm = vt.load("shapes-llava")
ds = vt.patch(vlm, samples, corruption=vt.ReplaceSpan("visual"),
              grid=vt.Grid(sites=("mlp", "attn"), windows=(1, 3, 6)))
vt.save(ds, "trace.zarr")
"""

__version__ = "0.1.0"

from .attribution import attribute
from .corruptions import GaussianNoise, ImagePair, ReplaceSpan, SymmetricTokenReplacement
from .data.sample import Sample
from .errors import UserError
from .knockout import knockout
from .metrics import KL, LogitDiff, LogProb, Probability, normalised
from .models.load import VLM, load, wrap
from .options import Options
from .results import open_result, save
from .sites import Grid
from .sweep import patch

__all__ = [
    "attribute",
    "KL",
    "VLM",
    "GaussianNoise",
    "Grid",
    "ImagePair",
    "LogProb",
    "LogitDiff",
    "Options",
    "Probability",
    "ReplaceSpan",
    "Sample",
    "UserError",
    "SymmetricTokenReplacement",
    "knockout",
    "load",
    "normalised",
    "open_result",
    "patch",
    "save",
    "wrap",
]
