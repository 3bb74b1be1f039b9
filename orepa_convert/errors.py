"""The errors orepa_convert raises on purpose. Each says what went wrong and what to do, in one line; the CLI
prints any :class:`OREPAError` so and exits 2. They also derive from the built-in class Python users expect
(``ValueError`` for bad input, ``RuntimeError`` for a step that cannot run), so existing ``except`` clauses work."""

from __future__ import annotations


class OREPAError(Exception):
    """Base of every error orepa_convert raises on purpose."""


class OREPAStateError(OREPAError, ValueError):
    """A conversion record, checkpoint or carried state that cannot be read, or that does not fit the model."""


class OREPALayoutError(OREPAStateError, RuntimeError):
    """A block's saved layout (its state_dict's extra state) does not match the block it is loaded into."""


class CompareError(OREPAError, ValueError):
    """A user mistake in a comparison's settings or studies."""


class CompareRunError(OREPAError, RuntimeError):
    """One run of a comparison failed; the message names its log."""


class RecipeError(OREPAError, ValueError):
    """Options of a training recipe that cannot run (e.g. a batch larger than the dataset)."""
