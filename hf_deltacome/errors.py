"""Exception and warning types. Every error a user can trigger with bad input is one of these, with a message naming
the input (file, module, tensor, shape or base model)."""

from __future__ import annotations


class DeltaCoMeError(ValueError):
    """Base class for all errors raised by hf-deltacome on bad input."""


class IncompatibleModelsError(DeltaCoMeError):
    """Base and fine-tuned models differ in architecture, module names, shapes or vocabulary."""


class ConfigError(DeltaCoMeError):
    """A `DeltaCoMeConfig` (or its JSON file) holds an invalid or inconsistent value."""


class AdapterFileError(DeltaCoMeError):
    """An adapter file is missing, truncated, corrupted, or disagrees with its config."""


class BaseModelMismatchError(DeltaCoMeError):
    """The adapter was compressed against a different base model than the one it is being loaded onto."""


class OutputFolderError(DeltaCoMeError):
    """An adapter would be written where it must not go (a model's folder, or inside an input model's folder)."""


class CalibrationError(DeltaCoMeError):
    """Calibration data could not be read or tokenized."""


class UnknownAdapterError(DeltaCoMeError):
    """A serving request named an adapter that is not loaded (or is being dropped)."""


class EngineClosedError(DeltaCoMeError):
    """The serving engine is shut down (or shutting down) and accepts no more requests."""


class EmptyDeltaError(DeltaCoMeError):
    """The fine-tune equals its base (within the rounding of their dtypes): there is nothing to compress."""


class DegenerateAdapterWarning(UserWarning):
    """The adapter about to be written stores little or nothing of the fine-tune's change to the target linears
    (every rank is 0 at this ratio, or only the dense extras changed)."""


class BaseModelMismatchWarning(UserWarning):
    """Emitted instead of :class:`BaseModelMismatchError` when the base check is not strict."""


class WeakBaseCheckWarning(UserWarning):
    """The base-model check passed but saw less than usual (unreadable weights, a version-1 fingerprint, or weights
    rounded differently from when the adapter was made), so a small change to the base could have gone unnoticed."""


class DecodeCacheFullWarning(UserWarning):
    """What the PyTorch path decodes from an adapter (the bands' factors, DARE parts' sparse matrices, vector codes'
    rows) does not fit ``DELTACOME_DEQUANT_CACHE_MB``: it is decoded again at every call, which is slower (a DARE part
    regenerates its mask). Emitted once per cache."""


class QuantizedBaseWarning(UserWarning):
    """An adapter made against a full-precision base is loaded onto a quantization of that base (AMLQ): it loads, but
    it does not correct the base's quantization error."""


# the libraries a warning's path runs through; the user's line is the first frame outside all of them
_LIBRARIES = ("hf_deltacome", "peft", "transformers", "accelerate", "torch")


def user_stacklevel() -> int:
    """The ``stacklevel`` (for ``warnings.warn`` in the calling function) of the first frame outside hf-deltacome
    and the libraries it runs inside (PEFT, transformers, accelerate, torch): a warning about the user's input
    names the user's line, whatever decorators, patches and hooks lie between."""
    import os
    import sys

    roots = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in map(sys.modules.get, _LIBRARIES)
                  if m is not None and getattr(m, "__file__", None))  # fmt: skip
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(roots):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 1
