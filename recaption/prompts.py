"""Prompt templates for captioning (VLM) and prompt expansion (LLM), and the parser of expansion replies."""

from __future__ import annotations

import json
import re

from clipmill.recaption.facts import ClipFacts

CAPTION_SYSTEM = (
    "You are a video captioner writing training captions for a text-to-video model. Describe what is visible: "
    "the main subjects and their appearance, what they do, the setting, the camera motion and framing, the "
    "lighting and the visual style. Write one dense paragraph of 60-150 words in plain present tense. Do not "
    "mention frames, images or that this is a description; do not invent text that is not shown."
)

EXPAND_SYSTEM = (
    "You write prompts for a text-to-video model that was trained on dense, descriptive captions. Given a "
    "description of a video, reply with exactly two lines and nothing else:\n"
    "SHORT: <a prompt of at most 15 words that a user might type for this video>\n"
    "LONG: <one dense paragraph of 60-150 words describing subjects, actions, setting, camera motion, lighting "
    "and style, in the style of the training captions>"
)


def caption_prompt(facts: ClipFacts, n_frames: int) -> str:
    """The user prompt that goes with a clip's frames: what the frames are, the measured facts, the task."""
    lines = [f"These {n_frames} images are frames sampled evenly, in order, from one video clip."]
    facts_lines = facts.lines()
    if facts_lines:
        lines.append("Measured facts about the clip (use them where they agree with what you see):")
        lines.extend(facts_lines)
    lines.append("Write the caption.")
    return "\n".join(lines)


def expand_request(caption: str, facts: ClipFacts | None = None) -> str:
    """The user prompt of an expansion: the description (a caption or a user's idea) plus measured facts."""
    lines = [f"Description: {caption.strip()}"]
    fl = facts.lines() if facts is not None else []
    if fl:
        lines.append("Measured facts:")
        lines.extend(fl)
    return "\n".join(lines)


_SPLIT = re.compile(r"\n|(?=\b(?:short|long)(?:\s+prompt)?\s*:)", re.I)
_LINE = re.compile(r"^\W*(short|long)(?:\s+prompt)?\W*:\s*(.*)$", re.I)


def parse_expansion(text: str) -> tuple[str, str]:
    """(short, long) from a reply in the SHORT:/LONG: line format (or a JSON object with those keys).

    ValueError("malformed reply: ...") when either part is missing or empty.
    """
    text = (text or "").strip()
    short = long = None
    if text.startswith("{"):
        try:
            data = json.loads(text)
            short, long = str(data.get("short") or "").strip(), str(data.get("long") or "").strip()
        except (ValueError, AttributeError):
            pass
    if not (short and long):
        cur = None
        parts: dict[str, list[str]] = {"short": [], "long": []}
        for line in _SPLIT.split(text):
            m = _LINE.match(line.strip())
            if m:
                cur = m.group(1).lower()
                parts[cur] = [m.group(2).strip()]
            elif cur:
                parts[cur].append(line.strip())
        short, long = " ".join(parts["short"]).strip(), " ".join(parts["long"]).strip()
    if not short or not long:
        raise ValueError(f"malformed reply: expected 'SHORT: ...' and 'LONG: ...' lines, got "
                         f"{text[:80]!r}{'...' if len(text) > 80 else ''}")
    return short.strip(" \"'"), long.strip(" \"'")
