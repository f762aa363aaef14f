"""chatglm-sft: fine-tune, run, evaluate and serve the ChatGLM family on today's PyTorch and transformers."""

__version__ = "0.1.0"

__all__ = ["load_model", "load_tokenizer", "__version__"]


def __getattr__(name: str):
    # Lazy: `import chatglm_sft` (and `chatglm-sft --help`) must not pay for importing torch and transformers.
    if name == "load_model":
        from chatglm_sft.models.loading import load_model

        return load_model
    if name == "load_tokenizer":
        from chatglm_sft.tokenization import load_tokenizer

        return load_tokenizer
    raise AttributeError(f"module 'chatglm_sft' has no attribute {name!r}")
