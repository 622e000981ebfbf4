"""clipmill.recaption: dense clip captions from a vision-language model, training prompts from an LLM.

Backends (one interface, `textgen.TextBackend`): in-process transformers (`hf.py`), in-process vLLM
(`vllm_backend.py`), any OpenAI-compatible HTTP server (`openai_http.py`), and offline built-ins that write
from measured metadata (`facts.py`: "clipmill/metadata" captions, "clipmill/template" prompts).

Public names are loaded lazily so that importing the package (e.g. for `expand_prompt`) pulls in neither
torch nor transformers, nor pydantic until a name that needs it is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "expand_prompt": "clipmill.recaption.core",
    "ExpandedPrompt": "clipmill.recaption.core",
    "ExpandSettings": "clipmill.recaption.core",
    "CaptionSettings": "clipmill.recaption.core",
    "CaptionResult": "clipmill.recaption.core",
    "caption_clips": "clipmill.recaption.core",
    "expand_clips": "clipmill.recaption.core",
    "GenerationConfig": "clipmill.recaption.config",
    "GenRequest": "clipmill.recaption.textgen",
    "GenResult": "clipmill.recaption.textgen",
    "TextBackend": "clipmill.recaption.textgen",
    "get_backend": "clipmill.recaption.backends",
    "make_backend": "clipmill.recaption.backends",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'clipmill.recaption' has no attribute {name!r}")
