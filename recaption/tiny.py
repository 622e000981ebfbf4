"""Tiny random models of real architectures, built offline from configs (for tests and benchmarks).

`build_tiny_vlm(path)` writes a Qwen2-VL model (vision tower, merger, Qwen2 decoder) with a few thousand
parameters per layer, its Qwen2VLProcessor (image processor + a byte-level BPE tokenizer trained here on a
small built-in corpus, with Qwen2-VL's special tokens and a ChatML chat template). `build_tiny_llm(path)`
writes a Qwen2 causal LM with the same tokenizer. Both are saved with `save_pretrained` (safetensors), so
they load through exactly the `from_pretrained` path real checkpoints take. Weights are random: the text
they generate is gibberish; they exercise the mechanics (chat templates, image tokens, batching, decoding).

Imports only torch, transformers and tokenizers (so GPU benchmark scripts can use it without clipmill's
other dependencies).
"""

from __future__ import annotations

import os
from pathlib import Path

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>"]

# ChatML, as Qwen2-VL's own template writes it (images become vision_start + image_pad + vision_end).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = (
    "A video clip of a person walking through a green park while the camera pans left. "
    "The scene is lit by warm evening sunlight; dominant colours are green, blue and brown. "
    "A red car drives down a busy city street at night, neon signs reflect on the wet road. "
    "Close-up of a cat on a skateboard, the camera tracks it slowly, soft natural light. "
    "On-screen text reads HELLO WORLD. The clip lasts four seconds and is shot in 16:9. "
    "Aerial view of mountains covered with snow, slow zoom in, cinematic style, high contrast. "
    "Write a dense caption describing subjects, actions, setting, camera motion, lighting and style. "
    "Short prompt: Long prompt: JSON {\"short\": \"...\", \"long\": \"...\"} "
    "0 1 2 3 4 5 6 7 8 9 . , : ; ! ? ' \" ( ) [ ] { } - _ / \\ % # @ & * + = < > | ~"
)


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE PreTrainedTokenizerFast trained on a small corpus, with ChatML/Qwen2-VL special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None, padding_side="left")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _text_config(vocab: int, **kw) -> dict:
    return dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                initializer_range=0.2, tie_word_embeddings=False, **kw)


def build_tiny_vlm(path: str | os.PathLike, seed: int = 0) -> Path:
    """Save a random tiny Qwen2-VL (model + processor + chat template) to `path`; returns the path."""
    import torch  # noqa: PLC0415
    from transformers import (  # noqa: PLC0415
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
    )

    path = Path(path)
    tok = build_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    image_proc = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14,
                                       temporal_patch_size=2, merge_size=2)
    try:
        from transformers import Qwen2VLVideoProcessor  # noqa: PLC0415

        video_proc = Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14,
                                           temporal_patch_size=2, merge_size=2)
    except ImportError:  # older transformers: no separate video processor
        video_proc = None
    kwargs = {"video_processor": video_proc} if video_proc is not None else {}
    proc = Qwen2VLProcessor(image_processor=image_proc, tokenizer=tok, chat_template=CHAT_TEMPLATE, **kwargs)
    text = _text_config(len(tok), rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                        rope_theta=10000.0, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                        bos_token_id=None)
    cfg = Qwen2VLConfig(
        text_config=text,
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_chans=3, initializer_range=0.2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def build_tiny_llm(path: str | os.PathLike, seed: int = 0) -> Path:
    """Save a random tiny Qwen2 causal LM with a tokenizer and chat template to `path`; returns the path."""
    import torch  # noqa: PLC0415
    from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: PLC0415

    path = Path(path)
    tok = build_tokenizer()
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = Qwen2Config(**_text_config(len(tok)), eos_token_id=eos, pad_token_id=pad, bos_token_id=None)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
