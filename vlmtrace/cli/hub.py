"""Fail at once, with what to do, when a model named on the command line cannot be fetched.

transformers retries an unreachable Hugging Face Hub for about 30 s and then raises an error
that says nothing about vlmtrace's ways around it. The command line asks first, in well under
a second: a shipped organism or a local directory needs no hub; a repo id in the local cache
loads offline; otherwise one metadata request with a short timeout says whether the hub
answers.

    check_model_source("llava-hf/llava-1.5-7b-hf")   # returns, or raises HubError
    check_pipeline_source("stabilityai/stable-diffusion-2-inpainting")   # --inpaint, the same way
"""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path

from ..errors import UserError

WAYS_AROUND = (
    "Either connect to the internet once so that the weights are cached, point HF_HOME at a "
    "cache that holds them (then HF_HUB_OFFLINE=1 keeps every later run offline), pass a local "
    "directory as --model, or run on a server that has them with --remote (NDIF or `vlmtrace "
    "serve`; this machine then needs only the config and processor). A shipped organism "
    "(--model {organisms}) needs no hub."
)


def organism_names() -> list[str]:
    """The shipped organisms' names, read from the package's folders (importing no torch)."""
    spec = importlib.util.find_spec("vlmtrace.models.zoo")
    folder = Path(spec.submodule_search_locations[0])
    return sorted(path.parent.name for path in folder.glob("*/config.json"))


class HubError(UserError):
    """A model that is neither shipped, local nor reachable on the Hugging Face Hub."""


def ways_around() -> str:
    """What to do instead of the hub, naming every shipped organism."""
    return WAYS_AROUND.format(organisms=", ".join(organism_names()))


def check_model_source(name: str, *, timeout: float = 5.0) -> None:
    """Return if `name` can be loaded here; raise HubError naming the ways around otherwise.

    A name one typo away from a shipped organism (`shapes-lava`) is answered at once with the
    organism it probably means, instead of a hub lookup that cannot succeed offline.
    """
    organisms = organism_names()
    if name in organisms or Path(name).expanduser().is_dir():
        return
    if "/" not in name and (close := difflib.get_close_matches(name, organisms, n=1, cutoff=0.75)):
        raise HubError(
            f"model {name!r} is neither a shipped organism nor a local directory; did you mean "
            f"{close[0]!r}? The shipped organisms are {', '.join(organisms)} (`vlmtrace zoo list`)."
        )
    check_repo(
        name,
        what="model",
        marker="config.json",
        instead=f"Give an existing model folder, a repo id, or a shipped organism ({', '.join(organisms)}).",
        ways=ways_around(),
        timeout=timeout,
    )


PIPELINE_WAYS = (
    "Either connect to the internet once so that the pipeline is cached, point HF_HOME at a cache "
    "that holds it, pass the pipeline's local directory, or use --inpaint opencv (offline, "
    "deterministic)."
)


def check_pipeline_source(name: str, *, timeout: float = 5.0) -> None:
    """Return if the inpainting backend `name` (`--inpaint`) can be loaded here; raise HubError
    otherwise, before any model loads (diffusers would retry an unreachable hub for ~30 s, and
    only when the recipe reaches its inpainting sweep)."""
    if name == "opencv" or Path(name).expanduser().is_dir():
        return
    check_repo(
        name,
        what="inpainting pipeline",
        marker="model_index.json",
        instead="Give a diffusers inpainting pipeline's folder or Hub id, or opencv.",
        ways=PIPELINE_WAYS,
        timeout=timeout,
    )


def check_repo(name: str, *, what: str, marker: str, instead: str, ways: str, timeout: float) -> None:
    """Return if Hub repo `name` is cached here (its `marker` file) or the Hub says it exists;
    raise HubError naming `what` it is and the `ways` around the Hub otherwise."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    try:  # a path that is not there ("./my-model") is not a repo id either: say which it is not
        validate_repo_id(name)
    except HFValidationError:
        raise HubError(
            f"{what} {name!r} is not a folder here ({Path(name).expanduser().absolute()} does not exist) "
            f"and not a Hub repo id (owner/name). {instead}"
        ) from None

    if isinstance(try_to_load_from_cache(name, marker), str):
        return  # cached: it is read without the network
    if constants.HF_HUB_OFFLINE:
        raise HubError(
            f"{what} {name!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            f"HF_HUB_OFFLINE is set, so it cannot be downloaded. {ways}"
        )
    try:
        HfApi().model_info(name, timeout=timeout)
    except GatedRepoError:
        raise HubError(
            f"{what} {name!r} is gated on the Hugging Face Hub: accept its licence on its page and "
            "log in (`hf auth login`, or set HF_TOKEN)."
        ) from None
    except RepositoryNotFoundError:
        raise HubError(
            f"no {what} {name!r} on the Hugging Face Hub (nor a local directory of that name). Check "
            "the repo id's spelling; a private repo needs HF_TOKEN."
        ) from None
    except HfHubHTTPError as error:
        raise HubError(f"the Hugging Face Hub refused {what} {name!r}: {error}. {ways}") from None
    except Exception as error:  # DNS, refused connection, timeout, proxy: the hub is unreachable
        raise HubError(
            f"{what} {name!r} is not cached here and the Hugging Face Hub "
            f"({constants.ENDPOINT}) is unreachable ({type(error).__name__}: {error}). {ways}"
        ) from None
