"""Stream a chat completion from the gateway's OpenAI-compatible HTTP face with the official SDK.

    python examples/python/openai_chat.py "Say hello" [--base-url http://127.0.0.1:8000/v1]

LLAMAFLEET_API_KEY is the API key (any string when the gateway runs without keys).
"""

from __future__ import annotations

import argparse
import os

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("message")
    parser.add_argument("--base-url", default=os.environ.get("LLAMAFLEET_HTTP", "http://127.0.0.1:8000/v1"))
    parser.add_argument("--model", default="demo:latest")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=os.environ.get("LLAMAFLEET_API_KEY", "none"))
    stream = client.chat.completions.create(
        model=args.model,
        messages=[{"role": "user", "content": args.message}],
        max_tokens=args.max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage:
            print(f"\n{chunk.usage.prompt_tokens} prompt + {chunk.usage.completion_tokens} completion tokens")


if __name__ == "__main__":
    main()
