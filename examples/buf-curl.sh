#!/usr/bin/env bash
# Streams a generation with `buf curl`, through the gateway's server reflection (no .proto files
# needed). Usage: examples/buf-curl.sh [PROMPT] [MAX_TOKENS]
#   LLAMAFLEET_GATEWAY  host:port of the gateway (default 127.0.0.1:50051)
#   LLAMAFLEET_API_KEY  sent as `authorization: Bearer <key>` when set
#   BUF                 the buf binary (default: the one `make install` puts in .venv/bin)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
buf="${BUF:-$here/../.venv/bin/buf}"
address="${LLAMAFLEET_GATEWAY:-127.0.0.1:50051}"
prompt="${1:-hello}"
max_tokens="${2:-24}"

# JSON-encode the prompt properly (quotes, newlines) rather than pasting it into a string.
body="$(python3 -c 'import json, sys; print(json.dumps({"prompt": sys.argv[1], "max_tokens": int(sys.argv[2])}))' \
  "$prompt" "$max_tokens")"
args=(curl --protocol grpc --http2-prior-knowledge -d "$body")
if [[ -n "${LLAMAFLEET_API_KEY:-}" ]]; then
  args+=(-H "authorization: Bearer ${LLAMAFLEET_API_KEY}")
fi
exec "$buf" "${args[@]}" "http://${address}/llamafleet.v1.Gateway/Generate"
