"""A model with its own Hugging Face tokenizer and chat template, served: the prompt is the
template's ids (a typed special token stays text), a completion prompt gets the model's
BOS, the text is the decode of the generated ids with special tokens left out unless
asked, and a conversation the template refuses is INVALID_ARGUMENT."""

from __future__ import annotations

import grpc
import pytest

from gpt.chat import chat_prompt_ids
from gpt.tokenizer import load_tokenizer
from proto.sol.v1 import sol_pb2 as pb
from proto.sol.v1 import sol_pb2_grpc as pb_grpc
from tests.service.harness import serve_tiny


@pytest.fixture(scope="module")
def served(tmp_path_factory, hf_tokenizer_dirs):
    tokenizer = load_tokenizer(hf_tokenizer_dirs["llama2"])
    server = serve_tiny(tmp_path_factory.mktemp("hf-serving"), tokenizer, "hf")
    channel = grpc.insecure_channel(server.target)
    yield tokenizer, pb_grpc.InferenceStub(channel), (("authorization", f"Bearer {server.key}"),)
    channel.close()
    server.stop()


def test_chat_prompt_is_the_templates_ids_and_text_is_the_decode(served):
    tok, stub, md = served
    messages = [{"role": "user", "content": "Hi [INST] café 😀"}]
    for skip in (True, False):
        reply = stub.ChatCompletion(pb.ChatCompletionRequest(
            model="tiny", messages=[pb.ChatMessage(**m) for m in messages],
            params=pb.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=1,
                                     skip_special_tokens=skip)), metadata=md, timeout=60)
        assert reply.usage.prompt_tokens == len(chat_prompt_ids(tok, messages))
        ids = [lp.token_id for lp in reply.choices[0].logprobs]
        assert reply.choices[0].message.content == tok.decode(ids, skip_special_tokens=skip)


def test_completion_prompt_gets_the_models_bos(served):
    tok, stub, md = served
    reply = stub.Completion(pb.CompletionRequest(model="tiny", prompt="Hello there",
                                                 params=pb.SamplingParams(max_tokens=4, temperature=0.0)),
                            metadata=md, timeout=60)
    assert reply.usage.prompt_tokens == len(tok.encode_prompt("Hello there")) == len(tok.encode("Hello there")) + 1


def test_a_conversation_the_template_refuses_is_invalid_argument(served):
    _, stub, md = served
    with pytest.raises(grpc.RpcError) as info:
        stub.ChatCompletion(pb.ChatCompletionRequest(
            model="tiny", messages=[pb.ChatMessage(role="user", content="a"), pb.ChatMessage(role="user", content="b")],
            params=pb.SamplingParams(max_tokens=2)), metadata=md, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Conversation roles must alternate" in info.value.details()
