"""Who answers the user: pick and build the agent that the settings ask for.

Each agent module imports its own dependencies, so an agent that is not used costs nothing (the
local one's llama-cpp-python is an optional extra).
"""

from __future__ import annotations

import logging

from rtcvoice.engines.base import Agent, AgentError
from rtcvoice.settings import Settings

log = logging.getLogger(__name__)

AGENT_KINDS = ("openai", "local", "webhook", "echo")

__all__ = ["AGENT_KINDS", "check_model", "create_agent", "describe_agent", "resolve_agent_kind"]


def resolve_agent_kind(settings: Settings) -> str:
    """The agent ``settings.agent`` means, with ``auto`` resolved."""
    kind = settings.agent.strip().lower()
    if kind == "auto":
        return "openai" if settings.openai_base_url or settings.openai_api_key else "local"
    if kind not in AGENT_KINDS:
        raise AgentError(f"unknown agent {settings.agent!r}: use one of auto, {', '.join(AGENT_KINDS)}.")
    return kind


def create_agent(settings: Settings) -> Agent:
    """Build the agent the settings ask for, or raise AgentError saying why it cannot serve and
    how to fix that. Nothing is loaded yet: call ``warm_up`` for that."""
    kind = resolve_agent_kind(settings)
    agent: Agent
    if kind == "openai":
        from rtcvoice.engines.agents.openai_chat import OpenAIChatAgent

        agent = OpenAIChatAgent(settings)
    elif kind == "local":
        from rtcvoice.engines.agents.local_llama import LocalLlamaAgent, resolve_model_path

        try:
            path = resolve_model_path(settings)
        except AgentError as exc:
            if settings.agent == "auto":
                # Say that "auto" chose local, and that an endpoint is the other way out.
                raise AgentError(
                    f"agent=auto chose the embedded local model because neither OPENAI_BASE_URL nor "
                    f"OPENAI_API_KEY is set, but: {exc}"
                ) from exc
            raise
        agent = LocalLlamaAgent(settings, model_path=path)
    elif kind == "webhook":
        from rtcvoice.engines.agents.webhook import WebhookAgent

        agent = WebhookAgent(settings)
    else:
        from rtcvoice.engines.agents.echo import EchoAgent

        agent = EchoAgent()
    log.info(
        "agent: %s%s", describe_agent(agent), " (chosen by agent=auto)" if settings.agent == "auto" else ""
    )
    return agent


def describe_agent(agent: Agent) -> str:
    """One line for logs and status pages: which agent, and its model or URL."""
    description = getattr(agent, "description", None)
    return description if isinstance(description, str) else agent.name


def check_model(agent: Agent, model: str) -> None:
    """Whether a session may ask ``agent`` for ``model``; AgentError (``model_unavailable``) if not.

    Agents that pass the name on (an OpenAI-compatible endpoint, the webhook) take any name: the
    endpoint says if it has no such model. An agent with one model of its own takes only its name.
    """
    if getattr(agent, "chooses_model", False) or model == getattr(agent, "model_name", agent.name):
        return
    raise AgentError(
        f"This server answers with {describe_agent(agent)}, which cannot switch to model {model[:64]!r}. "
        "Leave the model out, or run rtcvoice with --agent openai and an OPENAI_BASE_URL that serves it.",
        code="model_unavailable",
    )
