"""gRPC's tool-calling fields mapped onto the service's types: messages with their calls,
the request's tools (parameters arrive as JSON text) and tool_choice."""

from __future__ import annotations

import json

from gpt.chat import Message
from proto.sol.v1 import sol_pb2 as pb
from server.errors import invalid
from server.tools import Tool, ToolRequest, tool_request


def message(m: pb.ChatMessage) -> Message:
    calls = tuple({"id": c.id, "name": c.name, "arguments": c.arguments} for c in m.tool_calls)
    return Message(m.role, m.content, calls, m.tool_call_id)


def tools(request: pb.ChatCompletionRequest) -> ToolRequest | None:
    out = []
    for i, t in enumerate(request.tools):
        try:
            parameters = json.loads(t.parameters) if t.parameters else {}
        except ValueError as err:
            raise invalid(f"tools[{i}].parameters is not JSON ({err}); send the JSON Schema as JSON text",
                          f"tools[{i}].parameters") from None
        out.append(Tool(t.name, t.description, parameters))
    parallel = request.parallel_tool_calls if request.HasField("parallel_tool_calls") else None
    return tool_request(out, request.tool_choice or None, request.tool_choice_function, parallel)


def tool_calls_pb(calls) -> list[pb.ToolCall]:
    return [pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in calls]
