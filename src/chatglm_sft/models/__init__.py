"""Model classes, checkpoint conversion, loading and export."""

from chatglm_sft.models import chatglm_v1  # noqa: F401  (registers ChatGLM-6B with transformers' Auto classes)
