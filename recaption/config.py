"""Typed settings of a text-generation backend, shared by the caption and expand stages and `expand_prompt`.

One flat model so that a recipe line reads naturally (`caption: {backend: transformers, model: ..., num_gpus: 1}`)
and so that the runner finds `num_gpus`, `actors` and `batch_size` where it looks for them. Validation happens
when the recipe loads: a missing model, a base_url that is not http(s), or an `api_key_env` that looks like a
key rather than a variable name are errors before any video is touched. The key itself never appears here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Backends that need a model; the built-in ones ("metadata" for captions, "template" for prompts) need none.
MODEL_BACKENDS = ("transformers", "vllm", "openai")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class GenerationConfig(BaseModel):
    """How text is generated.

    Args:
        backend: "transformers" (in-process), "vllm" (in-process, GPU), "openai" (any OpenAI-compatible
            server), or the built-in offline writer of the stage ("metadata" captions, "template" prompts).
        model: hub id or local directory (transformers, vllm), or the model name the server knows (openai).
        revision: hub revision of the checkpoint.
        trust_remote_code: allow a checkpoint's own Python code (off by default; never needed for the models
            recipes/full.yaml names).
        device: "auto" (CUDA when visible), "cpu", "cuda" or "cuda:N" (transformers).
        dtype: "auto" (bfloat16 on GPU, float32 on CPU), "bfloat16", "float16", "float32".
        max_new_tokens: longest reply, in tokens.
        temperature: 0 = greedy (deterministic); > 0 samples.
        batch_size: rows per model call (and per actor batch when num_gpus > 0).
        num_gpus: GPUs per actor; > 0 makes the runner use an actor pool for the stage.
        actors: most actors of that pool.
        base_url: API root of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (openai).
        api_key_env: NAME of the environment variable holding the API key (openai); the key is never written
            to the recipe, run.json, logs or shards.
        timeout_s: per-request socket timeout (openai).
        retries: further attempts after a retryable failure (timeout, 5xx, 429, malformed reply) (openai).
        backoff_s: first retry delay; doubles per attempt (openai).
        concurrency: requests in flight at once (openai).
        max_model_len, gpu_memory_utilization, tensor_parallel_size: vLLM engine settings.
        system_prompt: replaces the built-in system prompt.
        threads: torch intra-op threads of an in-process model on CPU (None = torch's default, all cores;
            on a machine shared with other work, 1 per worker avoids oversubscription, which was measured
            here to make a tiny model 20x slower under load).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: str
    model: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_new_tokens: int = Field(256, ge=1, le=32768)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    batch_size: int = Field(8, ge=1, le=4096)
    num_gpus: float = Field(0.0, ge=0.0, le=64)
    actors: int = Field(1, ge=1, le=1024)
    base_url: str | None = None
    api_key_env: str | None = None
    timeout_s: float = Field(120.0, gt=0)
    retries: int = Field(3, ge=0, le=20)
    backoff_s: float = Field(1.0, ge=0)
    concurrency: int = Field(8, ge=1, le=1024)
    max_model_len: int | None = Field(None, ge=64)
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    system_prompt: str | None = None
    threads: int | None = Field(None, ge=1, le=256)

    @model_validator(mode="after")
    def _check(self) -> GenerationConfig:
        if self.backend in MODEL_BACKENDS and not self.model:
            raise ValueError(f"backend {self.backend!r} needs `model` (a hub id or local directory"
                             f"{', or the name the server serves' if self.backend == 'openai' else ''})")
        if self.backend == "openai":
            if not self.base_url or not self.base_url.startswith(("http://", "https://")):
                raise ValueError("backend 'openai' needs base_url: http(s)://host:port/v1")
        if self.api_key_env is not None and not _ENV_NAME.match(self.api_key_env):
            raise ValueError("api_key_env is the NAME of an environment variable (e.g. OPENAI_API_KEY), not the key")
        if self.backend in ("transformers", "vllm") and self.model and _looks_like_path(self.model) \
                and not Path(self.model).expanduser().exists():
            raise ValueError(f"model directory {self.model} does not exist")
        return self

    @property
    def builtin(self) -> bool:
        """True for the offline writers that need no model."""
        return self.backend not in MODEL_BACKENDS

    def backend_key(self) -> str:
        """JSON of the fields that decide which backend instance serves this config (for the cache)."""
        skip = {"num_gpus", "actors"}
        return self.model_dump_json(include=set(GenerationConfig.model_fields) - skip)


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists() or model.count("/") > 1
