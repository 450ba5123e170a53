"""Request validation names the field and the limit."""

import pytest

from llamafleet.errors import InvalidArgument
from llamafleet.generation import (
    GenerationLimits,
    llama_completion_body,
    params_from_request,
    validate_inputs,
    validate_params,
    validate_policy,
    validate_prompt,
)
from llamafleet.v1 import gateway_pb2

LIMITS = GenerationLimits()


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"stop": ["x"] * 9}, "stop"),
        ({"stop": [""]}, "stop[0]"),
        ({"n_probs": 99}, "n_probs"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
    ],
)
def test_out_of_range_parameters_name_their_field(fields: dict, field: str) -> None:
    request = gateway_pb2.GenerateRequest(prompt="hi", **fields)
    with pytest.raises(InvalidArgument) as info:
        validate_params(params_from_request(request, LIMITS), LIMITS)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}:")


def test_empty_and_oversized_prompts_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="prompt: must not be empty"):
        validate_prompt("", LIMITS)
    with pytest.raises(InvalidArgument, match="limit is 65536"):
        validate_prompt("x" * 70_000, LIMITS)


def test_embedding_inputs_are_bounded_and_named() -> None:
    validate_inputs(["a", "b"], LIMITS)
    for inputs, needle in (
        ([], "inputs: must hold at least one text"),
        (["a"] * 257, "inputs: holds 257 texts; the limit is 256"),
        (["a", ""], r"inputs\[1\]: must not be empty"),
        (["x" * 70_000], r"inputs\[0\]: is 70000 characters"),
    ):
        with pytest.raises(InvalidArgument, match=needle):
            validate_inputs(inputs, LIMITS)


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="policy"):
        validate_policy("fastest")


def test_defaults_and_body_mapping() -> None:
    request = gateway_pb2.GenerateRequest(prompt="hi", temperature=0.0, seed=7, stop=["\n"])
    params = params_from_request(request, LIMITS)
    validate_params(params, LIMITS)
    body = llama_completion_body("hi", params)
    assert body["n_predict"] == LIMITS.default_max_tokens
    assert body["temperature"] == 0.0
    assert body["seed"] == 7
    assert body["stop"] == ["\n"]
    assert body["stream"] is True
    assert "top_p" not in body  # unset fields keep llama-server's defaults
