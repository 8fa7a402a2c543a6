"""What each benchmark does last: its table (rows of numbers, and the settings they ran with) written as JSON, atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning_ipa.io import write_text_atomic


def write_results(path: str, settings: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Write ``{"settings": ..., "rows": ...}`` to ``path`` (folders created; atomic) and say where."""
    write_text_atomic(Path(path), json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    print(f"written: {path}")
