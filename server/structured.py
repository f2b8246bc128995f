"""Request fields that constrain the output, mapped onto the wire's StructuredOutputs: `response_format`
(chat), vLLM's `structured_outputs` object (both endpoints), and the JSON schema that `tool_choice`
`required` or a named function enforces. A request sets at most one of them."""

from __future__ import annotations

import json

from engine.messages import StructuredOutputs
from engine.structured import backend_class, constraint_of

from .protocol import APIError, NamedToolChoice, ResponseFormat, StructuredOutputsRequest, Tool


def _schema_text(schema, param: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise APIError(f"the JSON schema is not valid JSON: {e}", param=param) from None
    if not isinstance(schema, (dict, bool)):
        raise APIError("a JSON schema must be an object (or true/false)", param=param)
    return json.dumps(schema)


def from_structured_outputs(so: StructuredOutputsRequest) -> StructuredOutputs:
    given = [k for k in ("json", "json_object", "regex", "choice", "grammar") if getattr(so, k) not in (None, False)]
    if len(given) != 1:
        raise APIError(f"structured_outputs takes exactly one of json, json_object, regex, choice, grammar; "
                       f"got {given or 'none'}", param="structured_outputs")
    kind = given[0]
    if kind == "json":
        return StructuredOutputs(json=_schema_text(so.json, "structured_outputs.json"))
    if kind == "json_object":
        return StructuredOutputs(json_object=True)
    if kind == "choice":
        if not so.choice:
            raise APIError("structured_outputs.choice must list at least one string", param="structured_outputs.choice")
        return StructuredOutputs(choice=list(so.choice))
    text = getattr(so, kind)
    if not text:
        raise APIError(f"structured_outputs.{kind} must not be empty", param=f"structured_outputs.{kind}")
    return StructuredOutputs(**{kind: text})


def from_response_format(rf: ResponseFormat) -> StructuredOutputs | None:
    if rf.type == "text":
        return None
    if rf.type == "json_object":
        return StructuredOutputs(json_object=True)
    if rf.json_schema is None or rf.json_schema.schema is None:
        raise APIError("response_format json_schema needs json_schema.schema", param="response_format.json_schema")
    return StructuredOutputs(json=_schema_text(rf.json_schema.schema, "response_format.json_schema.schema"))


def _parameters(tool: Tool) -> dict:
    return tool.function.parameters if tool.function.parameters is not None else {"type": "object"}


def named_tool(tools: list[Tool], choice: NamedToolChoice) -> Tool:
    for t in tools:
        if t.function.name == choice.function.name:
            return t
    raise APIError(f"tool_choice names the function `{choice.function.name}`, which is not in tools",
                   param="tool_choice")


def for_tools(tools: list[Tool], choice, parallel: bool) -> StructuredOutputs | None:
    """`required`: a JSON array of {"name", "parameters"} calls, each naming a tool and giving its arguments;
    a named function: that function's arguments object. (`auto` and `none` constrain nothing.)"""
    if isinstance(choice, NamedToolChoice):
        return StructuredOutputs(json=json.dumps(_parameters(named_tool(tools, choice))))
    if choice != "required":
        return None
    calls = {"anyOf": [{"type": "object", "properties": {"name": {"enum": [t.function.name]},
                                                          "parameters": _parameters(t)},
                        "required": ["name", "parameters"], "additionalProperties": False} for t in tools]}
    schema = {"type": "array", "items": calls, "minItems": 1} | ({} if parallel else {"maxItems": 1})
    return StructuredOutputs(json=json.dumps(schema))


def check(spec: StructuredOutputs, backend: str, param: str, ignore_eos: bool, min_tokens: int) -> None:
    """The engine's own checks of a constraint (no compile), here so that a bad one is a 400 before anything
    starts, streaming included, rather than an error event after the stream began."""
    try:
        kind, value = constraint_of(spec)
        backend_class(backend).check_spec(kind, value)
    except ValueError as e:
        raise APIError(f"{param}: {e}", param=param) from None
    # The grammar decides where the output ends; these would fight it.
    if ignore_eos:
        raise APIError(f"ignore_eos cannot be combined with {param}", param="ignore_eos")
    if min_tokens:
        raise APIError(f"min_tokens cannot be combined with {param}", param="min_tokens")
