"""What a comparison variant names: ``plain``, an OREPA init, or an init with block options.

``preserve_live:live_scale=0.25`` or ``preserve:branches=origin+avg+pw,dws_expansion=4``: the init, a colon, then
``field=value`` pairs (comma-separated) of the :class:`~orepa_convert.OREPAConfig` block fields below; a list
value joins its items with ``+``.
"""

from __future__ import annotations

from typing import Any, cast

from ..config import INITS, Init, OREPAConfig
from ..errors import CompareError

#: OREPAConfig fields a variant may set, and how their text is read
OPTION_FIELDS: dict[str, Any] = {
    "live_scale": float,
    "branches": lambda text: tuple(text.split("+")),
    "pw_kxk_width": int,
    "dws_expansion": int,
}


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``(init, options)`` of an OREPA variant (``("plain", {})`` for plain); a one-line ``CompareError`` for
    anything else."""
    if text == "plain":
        return "plain", {}
    init, _, rest = text.partition(":")
    if init not in INITS:
        raise CompareError(f"unknown variant {text!r}; choose 'plain' or an init from {list(INITS)}")
    options: dict[str, Any] = {}
    for pair in filter(None, rest.split(",")):
        key, sep, value = pair.partition("=")
        if not sep or key not in OPTION_FIELDS:
            raise CompareError(
                f"variant {text!r}: {pair!r} is not FIELD=VALUE with FIELD one of {sorted(OPTION_FIELDS)}"
            )
        try:
            options[key] = OPTION_FIELDS[key](value)
        except ValueError:
            raise CompareError(f"variant {text!r}: cannot read {key}={value!r}") from None
    if rest and not options:
        raise CompareError(f"variant {text!r}: nothing after ':'; write e.g. {init}:live_scale=0.25")
    try:
        OREPAConfig(init=cast(Init, init), **options)
    except ValueError as exc:
        raise CompareError(f"variant {text!r}: {exc}") from None
    return init, options
