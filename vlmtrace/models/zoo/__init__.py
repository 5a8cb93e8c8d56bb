"""Model organisms: small trained VLMs shipped with vlmtrace, and the recipe that made them.

No model hub is reachable from every machine, and a 7B download is a poor first step, so
vlmtrace ships three organisms trained on its own synthetic scenes (`vlmtrace.data.scenes`):
a LLaVA (`LlavaForConditionalGeneration`), a BLIP-VQA (`BlipForQuestionAnswering`) and a
Qwen2-VL (`Qwen2VLForConditionalGeneration`: flat image tokens, M-RoPE), each an HF-format
directory next to this file. They are the default model of every recipe and the
ground on which the recipes are tested. The README's model card says what they know and what
their traces show.

Two more, the *planted* organisms (`planted.py`: a LLaVA and a Qwen2-VL), are trained with
strict interchange-intervention training against a declared high-level causal model, so their
mechanism is known (`mechanism.json` next to the weights) and `vlmtrace calibrate` can score
every localisation method against it.

    from vlmtrace.models.zoo import ORGANISMS, organism_dir, evaluate, train
    organism_dir("shapes-llava")        # LlavaForConditionalGeneration.from_pretrained(that)
    evaluate("shapes-llava", n=400)     # held-out accuracy per question family
    train("shapes-llava", "out/")       # rebuild the shipped weights from the seed
    train_planted("planted-llava", "out/")   # SIIT training, figures, mechanism.json, model card
"""

from .evaluation import evaluate, held_out_accuracy, load_organism
from .organisms import ORGANISMS, OrganismSpec, organism_dir, parameter_count
from .planted import PLANTED, PlantedSpec, fit_planted, train_planted
from .training import fit, train

__all__ = [
    "ORGANISMS",
    "OrganismSpec",
    "PLANTED",
    "PlantedSpec",
    "evaluate",
    "fit",
    "fit_planted",
    "held_out_accuracy",
    "load_organism",
    "organism_dir",
    "parameter_count",
    "train",
    "train_planted",
]
