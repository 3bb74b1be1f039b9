"""``python -m orepa_convert.cli``: the ``orepa-convert`` command."""

from . import main

raise SystemExit(main())
