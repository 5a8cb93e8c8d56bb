"""Which weights a model holds: a number per state, so that what was measured on them can be reused.

Two things in vlmtrace are worth keeping only while the weights they were computed on are the
model's: the model's own answers that every sweep is checked against (`native`), and MEMIT's key
covariance (`editing.updates.KeyCovariance`). Hashing the weights would cost more than either; an
in-place write (an edit applied, a restore) bumps each written tensor's version counter, so their
sum changes with every write and never comes back (`weights_version`). An `Edit` that restores the
exact originals says so (`restored`), and `weights_state` then names the weights by the state they
are equal to again, so statistics measured before the edit serve after it is undone.
"""

from __future__ import annotations

from weakref import WeakKeyDictionary

import torch

_parameters: WeakKeyDictionary[torch.nn.Module, list[torch.nn.Parameter]] = WeakKeyDictionary()


def weights_version(model: torch.nn.Module) -> int:
    """A number that changes whenever any parameter is written in place (an edit, a restore).

    The parameter list is gathered once per model (walking the module tree costs more than the
    sweep's self-check itself on a small model); edits write into these same tensors.
    """
    parameters = _parameters.get(model)
    if parameters is None:
        parameters = _parameters[model] = list(model.parameters())
    return sum(p._version for p in parameters)


_restored: WeakKeyDictionary[torch.nn.Module, tuple[int, int]] = WeakKeyDictionary()


def weights_state(model: torch.nn.Module) -> int:
    """A number naming the weights the model holds now: `weights_version`, except that weights an
    `Edit` has just put back exactly (`restored`) get the number they had before it was applied, so
    what was measured on them (a MEMIT key covariance) stays usable after an edit is undone."""
    version = weights_version(model)
    alias = _restored.get(model)
    return alias[1] if alias is not None and alias[0] == version else version


def restored(model: torch.nn.Module, before: int) -> None:
    """Record that the model's weights are now exactly those of `weights_state` `before`.

    `Edit.restore` calls it when nothing written between its apply and its restore is left
    written (nested edits, restored in turn, leave the state it applied on), and MEMIT's
    layer-by-layer spread when it has put the originals back: the equality holds by construction.
    Only the latest restore is kept: any later write moves `weights_version` past it for good.
    """
    _restored[model] = (weights_version(model), before)
