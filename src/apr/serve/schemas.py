"""Request bodies. OpenAI's schemas are closed, so unknown fields are refused (extra="forbid") and types are
strict ("5" is not 5). Fields real clients send with their default values are accepted; a value apr cannot
honour (n=2, a non-zero penalty, tools) is refused by `unsupported()` with a 400 naming the field.
Non-OpenAI extras that llama-server and vLLM also take: top_k, min_p, repeat_penalty, return_token_ids."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from apr.serve.errors import bad_request

Closed = ConfigDict(extra="forbid", strict=True)


class StreamOptions(BaseModel):
    model_config = Closed
    include_usage: bool = False
    include_obfuscation: bool | None = None  # sent by newer clients; nothing to obfuscate here


class TextPart(BaseModel):
    model_config = Closed
    type: Literal["text"]
    text: str


class ContentPart(BaseModel):
    """Any content part: text is used, others (images, audio) are refused by name."""
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = Closed
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None

    def as_template_message(self, index: int) -> dict:
        from apr.serve.tools import template_calls

        content = self.content
        if isinstance(content, list):
            other = next((p.type for p in content if p.type != "text"), None)
            if other:
                raise bad_request(f"content of type '{other}' is not supported (text only)",
                                  f"messages.{index}.content", "unsupported")
            content = "".join(p.text or "" for p in content)
        role = "system" if self.role == "developer" else self.role  # OpenAI's newer name for system
        msg = {"role": role, "content": content or ""}
        if self.tool_calls:  # an earlier call of the assistant's, rendered back by the template
            msg["tool_calls"] = template_calls(self.tool_calls)
        if self.role == "tool":
            msg.update({k: v for k, v in (("tool_call_id", self.tool_call_id), ("name", self.name)) if v})
        return msg


class Knobs(BaseModel):
    """Sampling knobs OpenAI's and Ollama's requests share (Ollama's sit in `options`)."""
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(None, gt=0.0)
    seed: int | None = None
    stop: Union[str, list[str], None] = None


class Sampling(Knobs):
    """Fields chat and completions share."""
    model_config = Closed
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    n: int | None = 1
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    return_token_ids: bool = False

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def check_supported(self) -> None:
        unsupported(self, n=1, frequency_penalty=0.0, presence_penalty=0.0)
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias", "unsupported")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options needs stream: true", "stream_options")


class ChatRequest(Sampling):
    messages: list[Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict | None = None
    tools: list[dict] | None = None
    tool_choice: Union[str, dict, None] = None
    parallel_tool_calls: bool | None = None
    functions: list[dict] | None = None
    function_call: Union[str, dict, None] = None
    metadata: dict | None = None
    store: bool | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's and llama-server's extra template variables

    def check_supported(self) -> None:
        super().check_supported()
        if not self.messages:
            raise bad_request("messages must not be empty", "messages", "empty_messages")
        if self.functions:
            raise bad_request("functions are not supported (use tools)", "functions", "unsupported")
        if self.modalities and self.modalities != ["text"]:
            raise bad_request("only the text modality is supported", "modalities", "unsupported")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        limit = self.max_limit()
        if limit is not None and limit <= 0:
            param = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
            raise bad_request(f"{param} must be at least 1, got {limit}", param, "invalid_value")

    def max_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


Prompt = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(Sampling):
    prompt: Prompt
    max_tokens: int | None = 16  # OpenAI's default for the legacy endpoint
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None
    best_of: int | None = 1

    def check_supported(self) -> None:
        super().check_supported()
        unsupported(self, best_of=1)
        if self.suffix:
            raise bad_request("suffix is not supported", "suffix", "unsupported")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise bad_request(f"max_tokens must be 0 or more, got {self.max_tokens}", "max_tokens", "invalid_value")
        if self.max_tokens == 0 and not self.echo:
            raise bad_request("max_tokens 0 needs echo: true (to score the prompt)", "max_tokens", "invalid_value")
        if self.stream and self.echo and self.logprobs is not None:
            raise bad_request("echo with logprobs is not supported when streaming", "echo", "unsupported")

    def prompts(self) -> list[Union[str, list[int]]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            p = [p]
        if not p or any(len(x) == 0 for x in p):
            raise bad_request("prompt must not be empty", "prompt", "empty_prompt")
        return list(p)


class TokenizeRequest(BaseModel):
    model_config = Closed
    model: str | None = None
    content: str | None = None  # llama-server's name
    prompt: str | None = None  # vLLM's name
    messages: list[Message] | None = None
    add_special: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = Closed
    model: str | None = None
    tokens: list[int]


def unsupported(req: BaseModel, **defaults) -> None:
    """400 naming the first field set to a value other than its default (None counts as the default)."""
    for name, default in defaults.items():
        value = getattr(req, name)
        if value is not None and value != default:
            raise bad_request(f"{name}={value!r} is not supported (only {default!r})", name, "unsupported")
