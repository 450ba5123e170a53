"""llamafleet: an LLM-serving fabric for llama.cpp fleets.

This package holds what every service shares (settings, telemetry, gRPC bootstrap and
error mapping, process supervision), the generated contracts in `llamafleet.v1`, and the
`llamafleet` command line.
"""

__version__ = "0.1.0"
