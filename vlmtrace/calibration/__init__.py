"""Calibration: every localisation method scored against organisms with planted mechanisms.

Whether a causal trace means what a paper says it means can only be measured on a model whose
mechanism is known. The planted organisms (`vlmtrace.models.zoo.planted`) are such models;
this package runs every method on them and scores it against the ground truth:

    ds = calibrate(("planted-llava",), Settings(samples=8))
    ds["auroc"].to_series()          # localisation, per (organism, method_name)
    ds["cpr"], ds["cmd"]             # MIB faithfulness of each method's circuit

- `truth`: which cells of a method's grid are planted;
- `methods`: each method's answer in one form (`Scored`);
- `scores`: AUROC, precision/recall, MIB's CPR and CMD (pure functions);
- `faithfulness`: ablating everything outside a circuit, with the engine's batched forward;
- `run`: the loop over organisms and methods, to an xarray Dataset (`vlmtrace calibrate`).
"""

from .run import METHODS, Settings, calibrate, calibrate_organism
from .scores import SIZES, auroc, curve_areas, faithfulness, precision_recall

__all__ = [
    "METHODS",
    "SIZES",
    "Settings",
    "auroc",
    "calibrate",
    "calibrate_organism",
    "curve_areas",
    "faithfulness",
    "precision_recall",
]
