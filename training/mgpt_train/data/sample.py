"""One training sample: a chat with ``<image>`` placeholders, its images, and a hierarchical tag."""

from __future__ import annotations

from dataclasses import dataclass

from mgpt_train.data.images import ImageInput
from mgpt_train.data.tokenizer import IMAGE_PLACEHOLDER, check_message


@dataclass(frozen=True)
class Sample:
    """``messages``: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]`` where each ``<image>`` in a
    content string stands for the next entry of ``images`` (PIL images, uint8 arrays or file paths, loaded when
    encoded). ``tag``: a "/"-separated path such as ``"vertical/gauge"`` - the curriculum mixes by tag prefix and
    evaluation reports accuracy per tag and per prefix."""

    messages: tuple[dict, ...]
    images: tuple[ImageInput, ...] = ()
    tag: str = "general"

    def __post_init__(self) -> None:
        object.__setattr__(self, "messages", tuple(self.messages))
        object.__setattr__(self, "images", tuple(self.images))
        if not self.messages:
            raise ValueError("Sample: messages must not be empty")
        placeholders = 0
        for index, message in enumerate(self.messages):
            placeholders += check_message(message, index)[1].count(IMAGE_PLACEHOLDER)
        if placeholders != len(self.images):
            raise ValueError(
                f"Sample: {placeholders} '{IMAGE_PLACEHOLDER}' placeholders but {len(self.images)} images"
            )
        if not any(message["role"] == "assistant" for message in self.messages):
            raise ValueError("Sample: at least one assistant message is needed (nothing to learn otherwise)")
        if not isinstance(self.tag, str) or not self.tag or any(not part for part in self.tag.split("/")):
            raise ValueError(f"Sample: tag must be a '/'-separated path like 'vertical/gauge', got {self.tag!r}")


def tag_matches(tag: str, prefix: str) -> bool:
    """True when ``prefix`` is ``tag`` or an ancestor ("vertical" matches "vertical/gauge", not "verticals")."""
    return tag == prefix or tag.startswith(prefix + "/")


def tag_prefixes(tag: str) -> list[str]:
    """``"a/b/c"`` -> ``["a", "a/b", "a/b/c"]``."""
    parts = tag.split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]
