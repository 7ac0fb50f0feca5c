"""Per-record checks, by category, for every data format.

The chat categories are those of OpenAI's fine-tuning data checker (data_type,
missing_messages_list, message_missing_key, message_unrecognized_key, unrecognized_role,
missing_content, example_missing_assistant_message; warnings for a missing system or user
message), counted per occurrence as that checker counts them. The other formats add
missing_field, wrong_type and not_a_number; reading adds invalid_json and wrong_field_count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from compiler.diagnostics import Diagnostic

# Keys a chat message may carry, by format: (role key, content key, other allowed keys, roles).
_CHAT_SHAPES: dict[str, tuple[str, str, str, tuple[str, ...], tuple[str, ...]]] = {
    "openai-chat": ("messages", "role", "content", ("name", "weight", "tool_calls", "tool_call_id", "function_call"),
                    ("system", "user", "assistant", "tool", "function")),
    "chatglm-chat": ("conversations", "role", "content", ("name", "tools", "metadata"),
                     ("system", "user", "assistant", "observation", "tool")),
    "sharegpt": ("conversations", "from", "value", ("name", "weight"),
                 ("system", "human", "user", "gpt", "assistant", "function_call", "observation", "tool")),
}
_USER_ROLES = ("user", "human")
_ASSISTANT_ROLES = ("assistant", "gpt", "function_call")
_TEXT_FIELDS = {
    "instruction": (("instruction", "output"), ("input",)),
    "completion": (("user_input", "completion"), ()),
    "scored": (("user_input", "completion"), ()),
    "preference": (("prompt", "chosen", "rejected"), ()),
    "prompt": (("user_input",), ()),
}


@dataclass(frozen=True)
class RowProblem:
    file: str
    line: int
    category: str
    message: str
    severity: str = "error"
    column: int | None = None
    help: str | None = None

    def diagnostic(self) -> Diagnostic:
        return Diagnostic(self.severity, f"{self.message} [{self.category}]", file=self.file, line=self.line,
                          column=self.column, help=self.help)


def check_record(fields: dict[str, Any], fmt: str, file: str, line: int) -> list[RowProblem]:
    """Every problem of one record (already renamed) against its format."""
    def problem(category: str, message: str, severity: str = "error", help: str | None = None) -> RowProblem:
        return RowProblem(file, line, category, message, severity, help=help)

    if fmt in _CHAT_SHAPES:
        return _check_chat(fields, fmt, problem)
    out = []
    required, optional = _TEXT_FIELDS.get(fmt, ((), ()))
    for name in required:
        if name not in fields:
            out.append(problem("missing_field", f"row has no {json.dumps(name)} ({fmt} format)",
                               help='map the file\'s keys with fields = { name = "file_key" }'))
        elif not isinstance(fields[name], str):
            out.append(problem("wrong_type", f"{name} is {_kind(fields[name])}, not a string"))
        elif not fields[name].strip():
            out.append(problem("empty_field", f"{name} is empty", "warning"))
    for name in optional:
        if name in fields and not isinstance(fields[name], str):
            out.append(problem("wrong_type", f"{name} is {_kind(fields[name])}, not a string"))
    if fmt == "scored":
        score = fields.get("score")
        if score is None:
            out.append(problem("missing_field", 'row has no "score" (scored format)'))
        elif isinstance(score, bool) or not _is_number(score):
            out.append(problem("not_a_number", f"score = {json.dumps(score)} is not a number"))
    return out


def _check_chat(fields: dict[str, Any], fmt: str, problem) -> list[RowProblem]:
    list_key, role_key, content_key, extra_keys, roles = _CHAT_SHAPES[fmt]
    messages = fields.get(list_key)
    if not isinstance(messages, list) or not messages:
        return [problem("missing_messages_list", f"row has no non-empty {json.dumps(list_key)} list")]
    out = []
    allowed = {role_key, content_key, *extra_keys}
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            out.append(problem("data_type", f"{list_key}[{i}] is {_kind(message)}, not an object"))
            continue
        if role_key not in message or content_key not in message:
            missing = [k for k in (role_key, content_key) if k not in message]
            out.append(problem("message_missing_key", f"{list_key}[{i}] has no {' or '.join(map(json.dumps, missing))}"))
        unknown = sorted(k for k in message if k not in allowed)
        if unknown:
            out.append(problem("message_unrecognized_key",
                               f"{list_key}[{i}] has unrecognized key(s) {', '.join(map(json.dumps, unknown))}"))
        if message.get(role_key) not in roles:
            out.append(problem("unrecognized_role",
                               f"{list_key}[{i}] has {role_key} {json.dumps(message.get(role_key))}; "
                               f"expected one of {', '.join(roles)}"))
        content = message.get(content_key)
        if not isinstance(content, str) or (not content and not message.get("function_call")
                                            and not message.get("tool_calls")):
            out.append(problem("missing_content", f"{list_key}[{i}] has no text {content_key}"))
    valid = [m for m in messages if isinstance(m, dict)]
    if not any(m.get(role_key) in _ASSISTANT_ROLES for m in valid):
        out.append(problem("example_missing_assistant_message", "the conversation has no assistant message"))
    if not any(m.get(role_key) == "system" for m in valid):
        out.append(problem("missing_system_message", "the conversation has no system message", "warning"))
    if not any(m.get(role_key) in _USER_ROLES for m in valid):
        out.append(problem("missing_user_message", "the conversation has no user message", "warning"))
    return out


def _is_number(value: Any) -> bool:
    if isinstance(value, (int, float)):
        return True
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _kind(value: Any) -> str:
    return {list: "an array", dict: "an object", str: "a string", bool: "true or false", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)
