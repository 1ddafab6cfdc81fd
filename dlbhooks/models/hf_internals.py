"""The private transformers internals dlbhooks relies on, in one guarded place.

transformers has no public API for these (checked on 5.25.0):

* reading and writing a config's attention implementation without recursing into its
  sub-configs (``config._attn_implementation_internal``, behind the
  ``config._attn_implementation`` property). ``PreTrainedModel.set_attn_implementation``
  exists, but only on whole models (dlbhooks also traces bare attention modules and
  layers), it validates and may fall back (sdpa -> eager) or warn and skip, and there is no
  public getter to restore the previous value exactly;
* whether the output collector of ``@capture_outputs`` asks for attention weights
  (``transformers.utils.output_capturing._active_collector``). The ``output_attentions``
  kwarg does not reach the attention function when it comes from the config, nor in GPT-2;
* GPT-2's own float32 attention (``_upcast_and_reordered_attn``, used by its eager path
  when ``reorder_and_upcast_attn`` is set; GPT-2, ImageGPT, Decision Transformer).

Each accessor was written against transformers 5.x and checked on 5.25.0 (the dependency
is capped below 6 in ``pyproject.toml``). When an internal is missing or has changed
shape it raises :class:`TransformersInternalError`, naming the internal and the installed
transformers version; there is never a silent fallback. ``tests/test_hf_internals.py``
checks each one against the installed transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import DLBError

#: the transformers release these accessors were last checked against
TESTED_VERSION = "5.25.0"


class TransformersInternalError(DLBError):
    """A private transformers internal dlbhooks relies on is missing or changed shape."""


def _version() -> str:
    try:
        import transformers
    except ImportError:  # pragma: no cover - only called from transformers code paths
        return "not installed"
    return str(getattr(transformers, "__version__", "unknown"))


def _fail(internal: str, problem: str) -> TransformersInternalError:
    return TransformersInternalError(
        f"transformers internal {internal} {problem} (installed transformers {_version()}; "
        f"dlbhooks was written against transformers {TESTED_VERSION}, and requires "
        "transformers>=5,<6). Install a tested transformers version, or report this to "
        "dlbhooks with the version above."
    )


# -- config._attn_implementation_internal ----------------------------------------------

_ATTN = "PreTrainedConfig._attn_implementation_internal"


def _check_attn_property(config: Any) -> None:
    prop = getattr(type(config), "_attn_implementation", None)
    if not isinstance(prop, property):
        raise _fail(_ATTN, f"is not behind a property PreTrainedConfig._attn_implementation "
                           f"any more (found {type(prop).__name__})")


def get_attn_implementation(config: Any) -> str | None:
    """The attention implementation of this config alone (not its sub-configs).

    Written against transformers 5.25.0: ``config._attn_implementation`` is a property
    reading ``config._attn_implementation_internal``, a ``str`` or ``None``, which every
    model reads through ``ALL_ATTENTION_FUNCTIONS.get_interface(...)``.
    """
    _check_attn_property(config)
    try:
        value = config._attn_implementation_internal
    except AttributeError:
        raise _fail(_ATTN, f"is missing on {type(config).__name__}") from None
    if value is not None and not isinstance(value, str):
        raise _fail(_ATTN, f"holds a {type(value).__name__}, not a str or None")
    if config._attn_implementation != value:
        raise _fail(_ATTN, "is no longer what config._attn_implementation returns")
    return value


def set_attn_implementation(config: Any, value: str | None) -> None:
    """Set the attention implementation of this config alone, without the recursion into
    sub-configs of the ``config._attn_implementation`` setter (so that restoring configs
    one by one restores each exactly). Written against transformers 5.25.0; checks that
    the models' ``config._attn_implementation`` then returns ``value``."""
    _check_attn_property(config)
    config._attn_implementation_internal = value
    if config._attn_implementation != value:
        raise _fail(_ATTN, "no longer sets what config._attn_implementation returns")


# -- transformers.utils.output_capturing._active_collector -------------------------------

_COLLECTOR = "transformers.utils.output_capturing._active_collector"


def collected_outputs() -> dict | None:
    """The outputs ``@capture_outputs`` is collecting in the current forward (keys such as
    ``"attentions"``, ``"hidden_states"``), or ``None`` when no collector is active (e.g.
    an attention module called on its own).

    Written against transformers 5.25.0: ``_active_collector`` is a
    ``CompileableContextVar`` whose ``get()`` returns that ``dict`` or ``None``.
    """
    try:
        module = importlib.import_module("transformers.utils.output_capturing")
    except ImportError as err:
        raise _fail(_COLLECTOR, f"cannot be imported ({err})") from None
    var = getattr(module, "_active_collector", None)
    if var is None or not callable(getattr(var, "get", None)):
        raise _fail(_COLLECTOR, "is missing or has no get()")
    value = var.get()
    if value is not None and not isinstance(value, dict):
        raise _fail(_COLLECTOR, f".get() returned a {type(value).__name__}, not a dict or None")
    return value


# -- GPT-2's _upcast_and_reordered_attn ---------------------------------------------------

_UPCAST = "GPT2Attention._upcast_and_reordered_attn"


def upcast_attention(module: Any):
    """GPT-2's own float32 attention method of ``module`` when its eager path uses it
    (``module.reorder_and_upcast_attn`` true), else ``None``.

    Written against transformers 5.25.0: ``GPT2Attention.forward`` (and ImageGPT's,
    Decision Transformer's) calls ``self._upcast_and_reordered_attn(query, key, value,
    attention_mask)`` instead of ``eager_attention_forward`` when that flag is set.
    """
    if not getattr(module, "reorder_and_upcast_attn", False):
        return None
    fn = getattr(module, "_upcast_and_reordered_attn", None)
    if not callable(fn):
        raise _fail(_UPCAST.replace("GPT2Attention", type(module).__name__),
                    "is missing although reorder_and_upcast_attn is set")
    return fn
