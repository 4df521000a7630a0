"""Bodies of vLLM's token endpoints, `POST /tokenize` and `POST /detokenize`: what a
gateway, a client trimming history to the context, or the playground asks before it
sends a request. The prompt goes through the same chat template, tokenizer and limits as
a chat or completion request's (InferenceService.tokenize); nothing runs or is billed.
"""

from __future__ import annotations

from pydantic import Field

from server.errors import invalid
from server.http.schemas import ChatMessage, ToolBody, _Body
from server.tools import Tool


class TokenizeRequest(_Body):
    model: str = Field(description="NAME, NAME:ALIAS or NAME@VERSION; its tokenizer and chat template are used")
    prompt: str | None = Field(default=None, description="raw text, tokenized as a completion's prompt")
    messages: list[ChatMessage] | None = Field(default=None, description="a conversation, rendered with the "
                                                                         "model's chat template")
    add_generation_prompt: bool = Field(default=True, description="with messages: open the assistant's turn, as a "
                                                                  "chat completion does")
    return_token_strs: bool = Field(default=False, description="also return each token's text")
    tools: list[ToolBody] | None = Field(default=None, description="with messages: tools given to the chat "
                                                                   "template, as a chat completion gives them")

    def what(self) -> dict:
        if (self.prompt is None) == (self.messages is None):
            raise invalid("send either prompt (raw text) or messages (a conversation), not both and not neither",
                          "prompt" if self.prompt is not None else "messages")
        if self.messages is not None:
            tools = [Tool(t.function.name, t.function.description, t.function.parameters or {}).openai()
                     for t in self.tools or ()]
            return {"messages": [m.message() for m in self.messages], "tools": tools or None}
        return {"prompt": self.prompt}


class TokenizeResponse(_Body):
    count: int = Field(description="how many tokens")
    max_model_len: int = Field(description="the model's context in tokens: prompt + max_tokens must fit in it")
    tokens: list[int]
    token_strs: list[str] | None = Field(default=None, description="each token's text, with return_token_strs")


class DetokenizeRequest(_Body):
    model: str = Field(description="NAME, NAME:ALIAS or NAME@VERSION; its tokenizer decodes")
    tokens: list[int] = Field(description="token ids of the model's vocabulary")


class DetokenizeResponse(_Body):
    prompt: str = Field(description="the text the ids decode to")
