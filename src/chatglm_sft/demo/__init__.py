"""`chatglm-sft demo`: the whole pipeline on a model and tokenizer the project makes itself."""
