"""Request and response bodies of the REST API; they are also its OpenAPI description."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

E164 = Annotated[str, StringConstraints(pattern=r"^\+[1-9][0-9]{1,14}$")]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200, strip_whitespace=True)]
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
    name: Annotated[str, StringConstraints(max_length=200, strip_whitespace=True)] = ""
    mode: Literal["live", "test"] = "live"


class AgentCreate(Body):
    name: Name
    instructions: Annotated[str, StringConstraints(max_length=20_000)] = ""


class AgentUpdate(Body):
    name: Name | None = None
    instructions: Annotated[str, StringConstraints(max_length=20_000)] | None = None


class CallCreate(Body):
    to_number: E164
    from_number: E164
    agent_id: AgentId | None = None
    transport: Transport = "sip"


class ConversationUpdate(Body):
    ai_mode: AiMode
    actor_user_id: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None


class MessageCreate(Body):
    text: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
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
