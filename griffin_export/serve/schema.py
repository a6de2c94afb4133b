"""The OpenAI API's requests and answers: a request body checked field by field into an `Ask`, every bad
one refused as an `ApiError` (an OpenAI error body and a 4xx status), and the answers and stream chunks
of /v1/completions and /v1/chat/completions. The decoding checks are DecodeOptions' own; its messages
name the library's parameters, so they are put in the API's words (`max_new_tokens` is `max_tokens`).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass

from ..errors import GriffinError
from ..model.decoding import Generation
from ..model.tokens import OVER_CONTEXT, check_generation_fits
from ..settings import DecodeOptions

ROLES = ("system", "developer", "user", "assistant")
MAX_STOPS = 4  # as OpenAI's API
SEED_RANGE = (0, 2**63 - 1)
# fields OpenAI's API has that this server does not do: accepted only at their neutral value
NEUTRAL = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (False, 0), "top_logprobs": (0,),
           "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},), "suffix": ("",),
           "tools": ([],), "functions": ([],)}


class ApiError(Exception):
    """A request the server refuses: its HTTP status and the OpenAI error body."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def api_words(message: str) -> str:
    """A library message in the API's words: its parameters are the request's fields."""
    return (message.replace("max_new_tokens", "max_tokens").replace("stop=STRING", "`stop` string")
            .replace("`stop` strings", "stop strings"))


@dataclass
class Ask:
    """A checked request."""

    chat: bool
    model: str
    prompt: str | None
    messages: list[dict] | None
    max_tokens: int | None  # None: the server's default, within the context
    opts: DecodeOptions  # max_new_tokens set once the prompt's length is known (decode_options)
    stream: bool
    include_usage: bool

    def decode_options(self, prompt_tokens: int, context: int | None, default: int) -> DecodeOptions:
        """The request's decoding with its token budget: max_tokens, refused past the context; else the
        server's default, cut to what the context leaves."""
        if self.max_tokens is None:
            room = context - prompt_tokens if context else default
            return _replace(self.opts, max_new_tokens=max(1, min(default, room)))
        try:
            check_generation_fits(prompt_tokens, self.max_tokens, context)
        except GriffinError as e:
            raise ApiError(400, api_words(str(e)), param="max_tokens", code="context_length_exceeded") from None
        return _replace(self.opts, max_new_tokens=self.max_tokens)


def _replace(opts: DecodeOptions, **kw) -> DecodeOptions:
    return DecodeOptions(**{**opts.__dict__, **kw})


def parse(body: bytes, *, chat: bool, models: list[str]) -> Ask:
    """A request body -> Ask, or ApiError naming the field at fault."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, got {_kind(data)}")
    model = _field(data, "model", str, required=True)
    if chat:
        prompt, messages = None, _messages(data)
    else:
        prompt, messages = _prompt(data), None
    max_tokens = _field(data, "max_completion_tokens" if chat and "max_completion_tokens" in data else "max_tokens",
                        int)
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"`max_tokens` must be >= 1, got {max_tokens}", param="max_tokens")
    temperature = _field(data, "temperature", float)
    top_p = _field(data, "top_p", float)
    seed = _field(data, "seed", int)
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ApiError(400, f"`seed` must be in {SEED_RANGE[0]}..{SEED_RANGE[1]}, got {seed}", param="seed")
    stop = _stop(data)
    ignore_eos = bool(_field(data, "ignore_eos", bool))  # vLLM's extension: answers of exactly max_tokens
    stream = bool(_field(data, "stream", bool))
    options = _field(data, "stream_options", dict)
    include_usage = False
    if options is not None:
        if not stream:
            raise ApiError(400, "`stream_options` goes with stream=true", param="stream_options")
        include_usage = bool(_field(options, "include_usage", bool, where="stream_options.include_usage"))
    for name, neutral in NEUTRAL.items():
        if data.get(name) is not None and not any(data[name] == v and type(data[name]) is type(v) for v in neutral):
            raise ApiError(400, f"`{name}` is not supported by this server (only {neutral[0]!r})", param=name)
    decode = DecodeOptions()
    try:
        opts = DecodeOptions(temperature=decode.temperature if temperature is None else temperature,
                             top_p=decode.top_p if top_p is None else top_p, stop=stop,
                             seed=decode.seed if seed is None else seed, stop_at_eos=not ignore_eos)
    except GriffinError as e:
        msg = str(e)
        param = next((p for p in ("temperature", "top_p", "stop", "seed") if p in msg), None)
        raise ApiError(400, api_words(msg), param=param) from None
    if model not in models:
        raise ApiError(404, f"the model {model!r} does not exist; this server has {', '.join(models)}", param="model",
                       code="model_not_found")
    return Ask(chat, model, prompt, messages, max_tokens, opts, stream, include_usage)


def context_error(e: GriffinError, chat: bool) -> ApiError:
    """A prompt (or a chat's messages) the tokenizer or the context refused."""
    msg = api_words(str(e))
    return ApiError(400, msg, param="messages" if chat else "prompt",
                    code="context_length_exceeded" if OVER_CONTEXT in msg else None)


def _kind(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _field(data: dict, name: str, kind: type, *, required: bool = False, where: str | None = None):
    """data[name] of type `kind` (float takes integers too; bool is no number), or None where it is absent
    or null; ApiError otherwise."""
    where = where or name
    value = data.get(name)
    if value is None:
        if required:
            raise ApiError(400, f"`{where}` is required", param=where)
        return None
    ok = (isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))) or (
        kind is float and type(value) is int)
    if not ok:
        want = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", dict: "an object",
                list: "an array"}[kind]
        raise ApiError(400, f"`{where}` must be {want}, got {_kind(value)}", param=where)
    if kind is float:
        value = float(value)
        if not math.isfinite(value):
            raise ApiError(400, f"`{where}` must be a finite number, got {value}", param=where)
    return value


def _prompt(data: dict) -> str:
    value = data.get("prompt")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]  # a batch of one
    if value is None:
        raise ApiError(400, "`prompt` is required", param="prompt")
    if not isinstance(value, str):
        raise ApiError(400, f"`prompt` must be a string (or an array of one string), got {_kind(value)}",
                       param="prompt")
    return value


def _messages(data: dict) -> list[dict]:
    value = _field(data, "messages", list, required=True)
    if not value:
        raise ApiError(400, "`messages` must hold at least one message", param="messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"`{where}` must be an object, got {_kind(m)}", param=where)
        role = _field(m, "role", str, required=True, where=f"{where}.role")
        if role not in ROLES:
            raise ApiError(400, f"`{where}.role` must be one of {', '.join(ROLES)}, got {role!r}",
                           param=f"{where}.role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"`{where}.content` parts must be text parts ({{\"type\": \"text\", \"text\": "
                               "...}): this model reads text only", param=f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"`{where}.content` must be a string, got {_kind(content)}", param=f"{where}.content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _stop(data: dict) -> tuple[str, ...]:
    value = data.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ApiError(400, f"`stop` must be a string or an array of strings, got {_kind(value)}", param="stop")
    if len(value) > MAX_STOPS:
        raise ApiError(400, f"`stop` takes at most {MAX_STOPS} strings, got {len(value)}", param="stop")
    return tuple(value)


# -- answers -----------------------------------------------------------------------------------------


def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def finish_reason(gen: Generation) -> str:
    return "length" if gen.stop_reason == "length" else "stop"


def usage(prompt_tokens: int, gen: Generation) -> dict:
    n = len(gen.token_ids)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}


def griffin_fields(gen_or_route: Generation | dict) -> dict:
    """What the answer says of how it was served: the class (or "full"), and whether the guard fired."""
    extra = gen_or_route.extra if isinstance(gen_or_route, Generation) else gen_or_route
    return {k: extra[k] for k in ("class", "routed", "guarded", "similarity", "margin") if k in extra}


def answer(ask: Ask, rid: str, prompt_tokens: int, gen: Generation) -> dict:
    """The whole answer (stream=false)."""
    if ask.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": gen.text}, "logprobs": None,
                  "finish_reason": finish_reason(gen)}
    else:
        choice = {"index": 0, "text": gen.text, "logprobs": None, "finish_reason": finish_reason(gen)}
    return {"id": rid, "object": "chat.completion" if ask.chat else "text_completion", "created": int(time.time()),
            "model": ask.model, "choices": [choice], "usage": usage(prompt_tokens, gen),
            "griffin": griffin_fields(gen)}


def chunk(ask: Ask, rid: str, *, text: str | None = None, finish: str | None = None, first: bool = False,
          usage_: dict | None = None, griffin: dict | None = None) -> dict:
    """One server-sent event's object: a piece of text, the finish, or (choices empty) the usage."""
    if usage_ is not None:
        choices = []
    elif ask.chat:
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
    out = {"id": rid, "object": "chat.completion.chunk" if ask.chat else "text_completion",
           "created": int(time.time()), "model": ask.model, "choices": choices}
    if ask.include_usage:
        out["usage"] = usage_
    if griffin is not None:
        out["griffin"] = griffin
    return out
