"""`chatglm-sft webui`: a gradio chat page over `ChatSession` (streamed replies, history, markdown and LaTeX, the
conversation's KV cache reused between turns, a selector for the served adapters)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import nullcontext

from chatglm_sft.infer.chat import ChatSession
from chatglm_sft.infer.engine import Engine
from chatglm_sft.infer.sampling import SamplingParams

LATEX = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "$", "right": "$", "display": False},
    {"left": "\\(", "right": "\\)", "display": False},
    {"left": "\\[", "right": "\\]", "display": True},
]
BASE = "base model"
"""The selector's entry for the model without an adapter."""
MAX_SESSIONS = 64
"""Conversations (browser sessions x adapters) whose KV cache is kept."""


def history_messages(history: list) -> list[dict]:
    """Gradio's history (messages format) as plain user/assistant messages."""
    messages = []
    for item in history:
        role, content = item["role"], item["content"]
        if isinstance(content, list):  # gradio 5+ may wrap text in parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if role in ("user", "assistant") and isinstance(content, str):
            messages.append({"role": role, "content": content})
    return messages


class Sessions:
    """One `ChatSession` per browser session and adapter, the least recently used dropped past `MAX_SESSIONS`."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._sessions: OrderedDict[tuple, ChatSession] = OrderedDict()

    def get(self, key: tuple) -> ChatSession:
        session = self._sessions.pop(key, None) or ChatSession(self.engine, SamplingParams())
        self._sessions[key] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session


def make_reply(engine: Engine, adapters: dict[str, str] | None = None):
    """The chat function: the page's history is the truth (the user may retry or edit), the session keeps the
    cache of what it last computed."""
    adapters = adapters or {}
    lock = threading.Lock()  # one generation at a time: the page is for trying a model, not for load
    sessions = Sessions(engine)

    def reply(message, history, system, max_new_tokens, temperature, top_p, adapter=BASE, request=None):
        key = (getattr(request, "session_hash", None), adapter)
        params = SamplingParams(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p))
        with lock, _using(engine, adapters.get(adapter)) if adapters else nullcontext():
            session = sessions.get(key)
            session.params, session.system = params, system or None
            session.history = history_messages(history)
            text = ""
            for delta in session.send(message):
                text += delta
                yield text
            yield text

    return reply


def _using(engine: Engine, adapter: str | None):
    """Generate with `adapter` (a PEFT adapter name), or with the base model (None)."""
    from peft import PeftModel

    model = engine.model
    if not isinstance(model, PeftModel):
        return nullcontext()
    if adapter is None:
        return model.disable_adapter()
    model.set_adapter(adapter)
    return nullcontext()


def build_ui(engine: Engine, title: str = "chatglm-sft", adapters: dict[str, str] | None = None):
    import gradio as gr

    chatbot = gr.Chatbot(latex_delimiters=LATEX, render_markdown=True, height=520)
    settings = [
        gr.Textbox(label="System message", value=""),
        gr.Slider(1, 2048, value=256, step=1, label="Max new tokens"),
        gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)"),
        gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p"),
    ]
    if adapters:
        settings.append(gr.Dropdown([BASE, *adapters], value=BASE, label="Adapter"))
    reply = make_reply(engine, adapters)

    def chat(message: str, history: list, *settings, request=None):
        yield from reply(message, history, *settings, request=request)

    chat.__annotations__["request"] = gr.Request  # gradio passes the browser session to a parameter so annotated

    return gr.ChatInterface(chat, chatbot=chatbot, additional_inputs=settings, title=title, api_name="chat")
