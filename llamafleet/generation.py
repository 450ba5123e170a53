"""The rules of a generation request, shared by the gateway (public edge) and the scheduler."""

from __future__ import annotations

import math
from collections.abc import Sequence

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from llamafleet.errors import InvalidArgument
from llamafleet.v1 import common_pb2, gateway_pb2


class GenerationLimits(BaseSettings):
    """Bounds a request must stay within; every violation names the field and the bound.

    Read from `LLAMAFLEET_<FIELD>` (e.g. LLAMAFLEET_MAX_TOKENS) by the gateway and the
    scheduler alike, so the two hops enforce the same limits."""

    model_config = SettingsConfigDict(env_prefix="LLAMAFLEET_", extra="ignore", frozen=True)

    max_prompt_chars: int = Field(default=65536, ge=1)
    max_tokens: int = Field(default=4096, ge=1)
    default_max_tokens: int = Field(default=128, ge=1)
    max_stop_sequences: int = Field(default=8, ge=0)
    max_stop_chars: int = Field(default=128, ge=1)
    max_n_probs: int = Field(default=32, ge=0)
    max_temperature: float = Field(default=5.0, ge=0)
    # Texts per embeddings request.
    max_embed_inputs: int = Field(default=256, ge=1)


POLICIES = ("round_robin", "least_loaded", "prefix_affinity")

_OPTIONAL_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
)


def _finite(field: str, value: float) -> None:
    if not math.isfinite(value):
        raise InvalidArgument(field, f"must be a finite number, got {value}")


def validate_prompt(prompt: str, limits: GenerationLimits) -> None:
    if not prompt:
        raise InvalidArgument("prompt", "must not be empty")
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidArgument("prompt", f"is {len(prompt)} characters; the limit is {limits.max_prompt_chars}")


def validate_inputs(inputs: Sequence[str], limits: GenerationLimits) -> None:
    """The texts of an embeddings request: 1 to max_embed_inputs, each 1 to max_prompt_chars characters."""
    if not inputs:
        raise InvalidArgument("inputs", "must hold at least one text")
    if len(inputs) > limits.max_embed_inputs:
        raise InvalidArgument("inputs", f"holds {len(inputs)} texts; the limit is {limits.max_embed_inputs}")
    for i, text in enumerate(inputs):
        if not text:
            raise InvalidArgument(f"inputs[{i}]", "must not be empty")
        if len(text) > limits.max_prompt_chars:
            raise InvalidArgument(f"inputs[{i}]", f"is {len(text)} characters; the limit is {limits.max_prompt_chars}")


def validate_policy(policy: str) -> None:
    if policy and policy not in POLICIES:
        raise InvalidArgument("policy", f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")


def validate_params(params: common_pb2.GenerationParams, limits: GenerationLimits) -> None:
    """Raise InvalidArgument for the first out-of-range field of `params`."""
    if params.max_tokens > limits.max_tokens:
        raise InvalidArgument("max_tokens", f"is {params.max_tokens}; the limit is {limits.max_tokens}")
    if params.HasField("temperature"):
        _finite("temperature", params.temperature)
        if not 0 <= params.temperature <= limits.max_temperature:
            raise InvalidArgument("temperature", f"must be in [0, {limits.max_temperature}], got {params.temperature}")
    if params.HasField("top_p"):
        _finite("top_p", params.top_p)
        if not 0 < params.top_p <= 1:
            raise InvalidArgument("top_p", f"must be in (0, 1], got {params.top_p}")
    if params.HasField("top_k") and params.top_k < 0:
        raise InvalidArgument("top_k", f"must be >= 0 (0 turns it off), got {params.top_k}")
    if params.HasField("min_p"):
        _finite("min_p", params.min_p)
        if not 0 <= params.min_p <= 1:
            raise InvalidArgument("min_p", f"must be in [0, 1], got {params.min_p}")
    if params.HasField("repeat_penalty"):
        _finite("repeat_penalty", params.repeat_penalty)
        if params.repeat_penalty <= 0:
            raise InvalidArgument("repeat_penalty", f"must be > 0 (1 turns it off), got {params.repeat_penalty}")
    for name in ("presence_penalty", "frequency_penalty"):
        if params.HasField(name):
            value = getattr(params, name)
            _finite(name, value)
            if not -2 <= value <= 2:
                raise InvalidArgument(name, f"must be in [-2, 2], got {value}")
    if len(params.stop) > limits.max_stop_sequences:
        raise InvalidArgument("stop", f"has {len(params.stop)} sequences; the limit is {limits.max_stop_sequences}")
    for i, stop in enumerate(params.stop):
        if not stop or len(stop) > limits.max_stop_chars:
            raise InvalidArgument(f"stop[{i}]", f"must be 1 to {limits.max_stop_chars} characters")
    if params.n_probs > limits.max_n_probs:
        raise InvalidArgument("n_probs", f"is {params.n_probs}; the limit is {limits.max_n_probs}")


def estimate_cost(prompt: str, params: common_pb2.GenerationParams) -> int:
    """Token budget of a request: a prompt-token estimate (about 4 characters a token) plus max_tokens."""
    return len(prompt) // 4 + 1 + params.max_tokens


def params_from_request(request: gateway_pb2.GenerateRequest, limits: GenerationLimits) -> common_pb2.GenerationParams:
    """The GenerationParams of a public request, with the default max_tokens filled in."""
    params = common_pb2.GenerationParams(
        max_tokens=request.max_tokens or limits.default_max_tokens,
        stop=request.stop,
        n_probs=request.n_probs,
        ignore_eos=request.ignore_eos,
    )
    for name in _OPTIONAL_FIELDS:
        if request.HasField(name):
            setattr(params, name, getattr(request, name))
    return params


def llama_completion_body(prompt: str, params: common_pb2.GenerationParams) -> dict:
    """The JSON body of llama-server's streaming `/completion` for these parameters."""
    body: dict = {
        "prompt": prompt,
        "stream": True,
        "n_predict": params.max_tokens,
        "cache_prompt": True,
        # Token ids in every event: they let the generation resume elsewhere exactly.
        "return_tokens": True,
    }
    if params.stop:
        body["stop"] = list(params.stop)
    if params.n_probs:
        body["n_probs"] = params.n_probs
    if params.ignore_eos:
        body["ignore_eos"] = True
    # llama-server names these sampling fields exactly as the contract does.
    for name in _OPTIONAL_FIELDS:
        if params.HasField(name):
            body[name] = getattr(params, name)
    return body
