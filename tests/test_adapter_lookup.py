"""Adapters are found by class and config, and a model no adapter describes stops before its weights.

BLIP-2 and InstructBLIP are one HF class each for two shapes of language model (decoder-only OPT /
Vicuna, encoder-decoder Flan-T5), told apart by `text_config.model_type`. A checkpoint directory
holding only a `config.json` shows that the lookup needs nothing else: had the loader gone on to
the processor or the weights, it would fail on their absence instead.
"""

from __future__ import annotations

import pytest
import transformers
from transformers import Blip2Config, GPT2Config, InstructBlipConfig, LlamaConfig, OPTConfig, T5Config

import vlmtrace as vt
from vlmtrace.models.refusals import REFUSED, RefusedArchitectureError
from vlmtrace.models.registry import UnsupportedVariantError, adapter_for

LANGUAGE_MODELS = {"opt": OPTConfig(), "t5": T5Config(), "llama": LlamaConfig(), "gpt2": GPT2Config()}


@pytest.mark.parametrize(
    ("config_class", "language_model", "family"),
    [
        (Blip2Config, "opt", "blip2"),
        (Blip2Config, "t5", "blip2_t5"),
        (InstructBlipConfig, "llama", "instructblip"),
        (InstructBlipConfig, "t5", "instructblip_t5"),
    ],
)
def test_one_class_with_two_language_models_gets_the_adapter_of_its_config(
    config_class, language_model, family
):
    config = config_class(text_config=LANGUAGE_MODELS[language_model].to_dict())
    architecture = config_class.__name__.replace("Config", "ForConditionalGeneration")
    assert adapter_for(architecture, config).family == family


def save_config(folder, config, architecture: str) -> str:
    config.architectures = [architecture]
    config.save_pretrained(folder)
    return str(folder)


def test_a_language_model_no_adapter_describes_is_refused_from_the_config(tmp_path):
    config = Blip2Config(text_config=GPT2Config().to_dict())
    with pytest.raises(UnsupportedVariantError, match="text_config.model_type='gpt2'"):
        vt.load(save_config(tmp_path, config, "Blip2ForConditionalGeneration"))


def test_a_refused_class_is_refused_from_the_config_naming_the_reason(tmp_path):
    config = transformers.Gemma3nConfig()
    with pytest.raises(RefusedArchitectureError, match="AltUp"):
        vt.load(save_config(tmp_path, config, "Gemma3nForConditionalGeneration"))


def test_a_class_name_alone_does_not_pick_between_variants():
    with pytest.raises(UnsupportedVariantError, match="pass the config"):
        adapter_for("Blip2ForConditionalGeneration")


def test_every_refused_class_is_one_this_transformers_ships():
    missing = [name for name in REFUSED if not hasattr(transformers, name)]
    assert not missing, f"REFUSED names classes transformers {transformers.__version__} lacks: {missing}"
