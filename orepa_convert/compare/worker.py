"""Run one comparison job in this process: ``python -m orepa_convert.compare.worker JOB.json RESULT.json``.

The harness (:mod:`.harness`) starts one such process per run, so that runs share no framework state and each
measures its own peak memory. It writes the run's records (one per evaluated split) to ``RESULT.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m orepa_convert.compare.worker JOB.json RESULT.json", file=sys.stderr)
        return 2
    os.environ.setdefault("YOLO_OFFLINE", "1")
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    settings, job, run_dir = spec["settings"], spec["job"], Path(spec["run_dir"])
    from .harness import CompareSettings, has_test_split
    from .runners import run_timm, run_ultralytics

    has_test = has_test_split(CompareSettings(**{**settings, "variants": tuple(settings["variants"])}))
    run = run_ultralytics if settings["backend"] == "ultralytics" else run_timm
    records = run(settings, job, run_dir, has_test)
    Path(argv[1]).write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
