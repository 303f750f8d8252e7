"""One exception family: the CLI prints any EdgeLMError as one line and exits non-zero."""


class EdgeLMError(Exception):
    """Base class: a problem the user can act on (bad file, bad argument, missing model)."""


class GGUFError(EdgeLMError):
    """The file is not a readable GGUF, or its metadata/tensors are inconsistent."""


class UnsupportedError(EdgeLMError):
    """Valid input that edgelm does not handle (architecture, quant type, tokenizer)."""


class ContextError(EdgeLMError):
    """The request does not fit in the context window."""


class ModelNotFoundError(EdgeLMError):
    """A model name or path that cannot be resolved or fetched."""
