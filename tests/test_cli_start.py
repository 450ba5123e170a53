"""What `llamafleet` loads at its start: every command pays for it, so the heavy parts
(OpenTelemetry, pydantic-settings, the gguf package and NumPy, the stack, the services) stay
out and are imported by the code that needs them."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("opentelemetry", "pydantic_settings", "prometheus_client", "gguf", "numpy", "httpx", "llamafleet.stack")


def test_the_cli_starts_without_heavy_modules() -> None:
    code = (
        "import json, sys, llamafleet.cli; "
        "print(json.dumps(sorted({m.split('.')[0] if not m.startswith('llamafleet.') else m for m in sys.modules})))"
    )
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout))
    assert not loaded & set(HEAVY)
    assert "services" not in loaded
