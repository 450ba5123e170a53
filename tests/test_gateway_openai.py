"""The gateway's translations: OpenAI request bodies to GenerateRequest, chat rendering, errors
to OpenAI's JSON shape, downstream statuses. (Against the real stack: tests/test_gateway_stack.py.)"""

from __future__ import annotations

import base64
import json

import grpc
import numpy as np
import pytest

from llamafleet.errors import InvalidArgument, NotFound, ResourceExhausted, Unauthenticated
from llamafleet.v1 import common_pb2, gateway_pb2
from services.gateway.core import retry_after_of
from services.gateway.openai_api import (
    _Reply,
    completion_prompt,
    embed_request,
    embeddings_json,
    error_response,
    generate_request,
    render_chat,
    top_logprobs,
)


def test_openai_fields_map_onto_the_generate_request() -> None:
    body = {
        "model": "demo:latest",
        "max_tokens": 12,
        "temperature": 0,
        "top_p": 0.5,
        "seed": 7,
        "stop": "\n",
        "top_k": 3,
        "ignore_eos": True,
        "presence_penalty": 1,
    }
    request = generate_request(body, "hi", "rid")
    assert (request.prompt, request.model, request.request_id, request.max_tokens) == ("hi", "demo:latest", "rid", 12)
    assert request.HasField("temperature") and request.temperature == 0
    assert request.top_p == 0.5 and request.seed == 7 and request.top_k == 3 and request.presence_penalty == 1
    assert list(request.stop) == ["\n"] and request.ignore_eos
    assert not request.HasField("min_p")
    assert generate_request({"max_completion_tokens": 5, "max_tokens": 9}, "hi", "r").max_tokens == 5


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"max_tokens": 2**40}, "max_tokens"),
        ({"seed": -1}, "seed"),
        ({"stop": [1]}, "stop"),
        ({"n": 2}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"echo": True}, "echo"),
        ({"model": 5}, "model"),
    ],
)
def test_malformed_fields_are_named(body: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        generate_request(body, "hi", "r")
    assert info.value.field == field


def test_logprobs_ask_llama_server_for_at_least_one_alternative() -> None:
    assert generate_request({}, "hi", "r").n_probs == 0
    assert generate_request({"logprobs": 3}, "hi", "r").n_probs == 3
    assert generate_request({"logprobs": 0}, "hi", "r").n_probs == 1
    assert generate_request({"logprobs": True, "top_logprobs": 4}, "hi", "r", chat=True).n_probs == 4
    assert generate_request({"logprobs": True}, "hi", "r", chat=True).n_probs == 1
    assert top_logprobs({"logprobs": False}, chat=True) is None
    assert top_logprobs({"logprobs": True}, chat=True) == 0
    for body, field in (({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": 2}, "logprobs")):
        with pytest.raises(InvalidArgument) as info:
            generate_request(body, "hi", "r", chat=True)
        assert info.value.field == field


def _tokens() -> list[common_pb2.TokenLogprobs]:
    top = [common_pb2.TopLogprob(token=" a", logprob=-0.5), common_pb2.TopLogprob(token=" b", logprob=-1.5)]
    return [
        common_pb2.TokenLogprobs(token=" a", logprob=-0.5, top=top),
        common_pb2.TokenLogprobs(token="é", logprob=float("-inf"), top=top),
    ]


def test_chat_logprobs_take_openai_shape() -> None:
    reply = _Reply(True, "r", "m", top=1)
    result = common_pb2.GenerationResult(finish_reason=common_pb2.FINISH_REASON_LENGTH)
    logprobs = reply.complete(" aé", result, _tokens())["choices"][0]["logprobs"]
    assert logprobs["refusal"] is None
    first, second = logprobs["content"]
    assert first == {
        "token": " a",
        "logprob": -0.5,
        "bytes": [32, 97],
        "top_logprobs": [{"token": " a", "logprob": -0.5, "bytes": [32, 97]}],
    }
    assert second["bytes"] == list("é".encode()) and second["logprob"] == -9999.0  # JSON has no -inf
    assert _Reply(True, "r", "m").complete("x", result, _tokens())["choices"][0]["logprobs"] is None


def test_completion_logprobs_offsets_continue_across_streamed_chunks() -> None:
    reply = _Reply(False, "r", "m", top=2)
    tokens = _tokens()
    first = reply.delta(" a", None, True, tokens[:1])["choices"][0]["logprobs"]
    second = reply.delta("é", None, False, tokens[1:])["choices"][0]["logprobs"]
    assert first == {
        "tokens": [" a"],
        "token_logprobs": [-0.5],
        "top_logprobs": [{" a": -0.5, " b": -1.5}],
        "text_offset": [0],
    }
    assert second["text_offset"] == [2] and second["token_logprobs"] == [-9999.0]
    assert reply.delta("", "stop", False)["choices"][0]["logprobs"] is None


def test_completion_prompt_is_one_string() -> None:
    assert completion_prompt({"prompt": "a"}) == "a"
    assert completion_prompt({"prompt": ["a"]}) == "a"
    for prompt in (None, ["a", "b"], [1, 2, 3]):
        with pytest.raises(InvalidArgument, match="prompt"):
            completion_prompt({"prompt": prompt})


def test_chat_renders_as_chatml() -> None:
    body = {
        "messages": [
            {"role": "developer", "content": "Be terse."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
        ]
    }
    assert render_chat(body) == (
        "<|im_start|>system\nBe terse.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([], "messages"),
        (None, "messages"),
        ([{"role": "wizard", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0]"),
        ([{"role": "user", "content": 3}], "messages[0].content"),
    ],
)
def test_bad_chat_messages_are_named(messages, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        render_chat({"messages": messages})
    assert info.value.field == field


@pytest.mark.parametrize(
    ("exc", "status", "kind"),
    [
        (InvalidArgument("top_p", "must be in (0, 1]"), 400, "invalid_request_error"),
        (Unauthenticated("invalid API key"), 401, "authentication_error"),
        (NotFound("model: no model"), 404, "not_found_error"),
        (ResourceExhausted("slow down", retry_after=0.2), 429, "rate_limit_error"),
        (RuntimeError("boom"), 500, "server_error"),
    ],
)
def test_errors_take_openai_shape_and_status(exc: Exception, status: int, kind: str) -> None:
    response = error_response(exc)
    assert response.status == status
    error = json.loads(response.text)["error"]
    assert error["type"] == kind and error["message"]
    if isinstance(exc, InvalidArgument):
        assert error["param"] == "top_p" and error["code"] == grpc.StatusCode.INVALID_ARGUMENT.name.lower()
    if isinstance(exc, ResourceExhausted):
        assert response.headers["Retry-After"] == "1"  # whole seconds, rounded up
    if isinstance(exc, RuntimeError):
        assert "boom" not in error["message"] and "error id" in error["message"]


def test_downstream_statuses_keep_their_meaning() -> None:
    def rpc_error(code: grpc.StatusCode, trailers: tuple = ()) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), "from the scheduler")

    # The scheduler's queue-full retry-after is what the gateway passes on.
    assert retry_after_of(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, (("retry-after", "1.000"),))) == 1.0
    assert retry_after_of(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED)) is None
    assert error_response(rpc_error(grpc.StatusCode.UNAVAILABLE)).status == 503
    assert error_response(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED)).status == 504


def test_embeddings_bodies_map_onto_embed_requests() -> None:
    assert list(embed_request({"input": "hi", "model": "e:1"}, "r").inputs) == ["hi"]
    request = embed_request({"input": ["a", "b"], "encoding_format": "base64"}, "r")
    assert list(request.inputs) == ["a", "b"] and request.request_id == "r"
    for body, field in (
        ({"input": [[1, 2]]}, "input"),
        ({"input": 3}, "input"),
        ({"input": "a", "dimensions": 8}, "dimensions"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ):
        with pytest.raises(InvalidArgument) as info:
            embed_request(body, "r")
        assert info.value.field == field


def test_embeddings_answer_in_openai_shape_as_floats_or_base64() -> None:
    response = gateway_pb2.EmbedResponse(
        embeddings=[gateway_pb2.Embedding(values=[0.6, 0.8]), gateway_pb2.Embedding(values=[1.0, 0.0])],
        prompt_tokens=5,
    )
    floats = embeddings_json(response, "e:1", "float")
    assert floats["object"] == "list" and floats["model"] == "e:1"
    assert floats["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    assert [d["index"] for d in floats["data"]] == [0, 1] and floats["data"][1]["embedding"] == [1.0, 0.0]
    encoded = embeddings_json(response, "e:1", "base64")["data"][0]["embedding"]
    assert np.frombuffer(base64.b64decode(encoded), dtype="<f4").tolist() == pytest.approx([0.6, 0.8])
