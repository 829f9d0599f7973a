"""Request and response bodies of the REST API; they are also its OpenAPI description."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints
from pydantic_core import PydanticCustomError


def storable_text(value: str) -> str:
    """Refuses what Postgres cannot store in a text column (a NUL character) and what is not
    Unicode text at all (a lone surrogate from a JSON `\\ud800` escape, which cannot be encoded
    as UTF-8): both would otherwise fail in the database, as a 500, after validation passed."""
    if "\x00" in value:
        raise PydanticCustomError("string_nul", "must not contain NUL (\\u0000) characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError(
            "string_unicode", "must be valid Unicode (no lone surrogates)"
        ) from None
    return value


# Every free-text field of every request body carries STORABLE, last (after its length and
# whitespace constraints: pydantic drops constraints layered on top of an annotated type), so
# the rule above holds everywhere. Patterned fields (ids, phone numbers) cannot hold either.
STORABLE = AfterValidator(storable_text)
Text = Annotated[str, STORABLE]

# Patterns run on pydantic's Rust regex engine, where `$` matches only at the very end (Python's
# `re` would also match before a final newline); test_http_hardening pins that.
E164 = Annotated[str, StringConstraints(pattern=r"^\+[1-9][0-9]{1,14}$")]
Name = Annotated[
    str, StringConstraints(min_length=1, max_length=200, strip_whitespace=True), STORABLE
]
AiMode = Literal["ai", "human", "closed"]
Transport = Literal["esl", "sip", "webrtc"]
Channel = Literal["sms", "whatsapp"]


# Ids in paths and bodies: a malformed one is a 400 naming the field, before any lookup.
KeyId = Annotated[str, StringConstraints(pattern=r"^key_[0-9A-Za-z]{16,64}$")]
AgentId = Annotated[str, StringConstraints(pattern=r"^agt_[0-9A-Za-z]{16,64}$")]
CallId = Annotated[str, StringConstraints(pattern=r"^call_[0-9A-Za-z]{16,64}$")]
ConversationId = Annotated[str, StringConstraints(pattern=r"^conv_[0-9A-Za-z]{16,64}$")]


class Body(BaseModel):
    # Unknown fields are refused, so a typo in a field name is a 400, not a silent default.
    model_config = ConfigDict(extra="forbid")


class KeyCreate(Body):
    name: Annotated[str, StringConstraints(max_length=200, strip_whitespace=True), STORABLE] = ""
    mode: Literal["live", "test"] = "live"


class AgentCreate(Body):
    name: Name
    instructions: Annotated[str, StringConstraints(max_length=20_000), STORABLE] = ""


class AgentUpdate(Body):
    name: Name | None = None
    instructions: Annotated[str, StringConstraints(max_length=20_000), STORABLE] | None = None


class CallCreate(Body):
    to_number: E164
    from_number: E164
    agent_id: AgentId | None = None
    transport: Transport = "sip"


class ConversationUpdate(Body):
    ai_mode: AiMode
    actor_user_id: (
        Annotated[str, StringConstraints(min_length=1, max_length=200), STORABLE] | None
    ) = None


class MessageCreate(Body):
    text: Annotated[str, StringConstraints(min_length=1, max_length=4096), STORABLE]
    conversation_id: ConversationId | None = Field(
        default=None, description="Reply in this conversation; or give channel and numbers."
    )
    channel: Channel | None = None
    to_number: E164 | None = None
    from_number: E164 | None = None


# --- responses ---------------------------------------------------------------------------


class Workspace(BaseModel):
    id: str
    name: str
    created_at: str


class ApiKey(BaseModel):
    id: str
    name: str
    mode: str
    display_prefix: str
    created_at: str
    revoked_at: str | None


class ApiKeyCreated(ApiKey):
    api_key: str = Field(description="The secret, shown this once; only its hash is stored.")


class ApiKeyList(BaseModel):
    keys: list[ApiKey]
    next_page_token: str | None = None


class Agent(BaseModel):
    id: str
    name: str
    instructions: str
    created_at: str
    updated_at: str


class AgentList(BaseModel):
    agents: list[Agent]
    next_page_token: str | None = None


class Turn(BaseModel):
    id: str
    role: str
    text: str
    spoken_at: str


class CallQuality(BaseModel):
    mos: float | None = None
    packet_loss_pct: float | None = None
    jitter_ms: float | None = None
    rtt_ms: float | None = None


class Call(BaseModel):
    id: str
    agent_id: str | None
    direction: str
    transport: str
    from_number: str
    to_number: str
    status: str
    started_at: str
    ended_at: str | None
    ended_by: str | None
    duration_seconds: float | None
    quality: CallQuality | None = Field(
        None, description="What the media plane last measured (`call.quality`), if anything."
    )


class CallWithTurns(Call):
    turns: list[Turn]


class CallList(BaseModel):
    calls: list[Call]
    next_page_token: str | None = None


class Message(BaseModel):
    id: str
    conversation_id: str
    direction: str
    text: str
    status: str
    created_at: str
    updated_at: str


class MessageList(BaseModel):
    messages: list[Message]
    next_page_token: str | None = None


class Conversation(BaseModel):
    id: str
    agent_id: str | None
    channel: str
    customer_number: str
    business_number: str
    ai_mode: str
    created_at: str
    updated_at: str
    last_message_at: str | None


class ConversationWithMessages(Conversation):
    messages: list[Message] = Field(description="The latest messages, oldest first.")


class ConversationChanged(Conversation):
    changed: bool


class ConversationList(BaseModel):
    conversations: list[Conversation]
    next_page_token: str | None = None


class ErrorBody(BaseModel):
    error_code: str
    message: str
    request_id: str
    documentation_url: str
