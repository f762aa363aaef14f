"""`chatglm-sft webui`: a gradio chat page over the engine (streamed replies, history, markdown and LaTeX)."""

from __future__ import annotations

import threading

from chatglm_sft.conversation import encode_conversation
from chatglm_sft.infer.chat import clean_response
from chatglm_sft.infer.engine import Engine
from chatglm_sft.infer.sampling import SamplingParams

LATEX = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "$", "right": "$", "display": False},
    {"left": "\\(", "right": "\\)", "display": False},
    {"left": "\\[", "right": "\\]", "display": True},
]


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


def make_reply(engine: Engine):
    lock = threading.Lock()  # one generation at a time: the page is for trying a model, not for load

    def reply(message: str, history: list, system: str, max_new_tokens: int, temperature: float, top_p: float):
        messages = ([{"role": "system", "content": system}] if system else []) + history_messages(history)
        messages.append({"role": "user", "content": message})
        prompt = encode_conversation(engine.tokenizer, messages, add_generation_prompt=True).input_ids
        params = SamplingParams(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p))
        raw = ""
        with lock:
            for delta in engine.stream(prompt, params):
                raw += delta
                yield clean_response(raw, engine.family)
        yield clean_response(raw, engine.family)

    return reply


def build_ui(engine: Engine, title: str = "chatglm-sft"):
    import gradio as gr

    chatbot = gr.Chatbot(latex_delimiters=LATEX, render_markdown=True, height=520)
    settings = [
        gr.Textbox(label="System message", value=""),
        gr.Slider(1, 2048, value=256, step=1, label="Max new tokens"),
        gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)"),
        gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p"),
    ]
    return gr.ChatInterface(
        make_reply(engine), chatbot=chatbot, additional_inputs=settings, title=title, api_name="chat"
    )
