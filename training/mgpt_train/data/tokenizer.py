"""Offline byte-level tokenizer with Qwen-style special tokens and chat format.

Ids 0..255 are raw UTF-8 bytes; the special tokens follow; the vocabulary is padded with reserved ids up to a
multiple of 64 so a vocabulary-parallel LM head splits evenly over common tensor-parallel degrees.
Plain text never produces special ids (``encode("<|im_end|>")`` is 10 byte tokens), so user text cannot inject
chat structure.
"""

from __future__ import annotations

from collections.abc import Sequence

IMAGE_PLACEHOLDER = "<image>"
CHAT_ROLES = ("system", "user", "assistant")

_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|pad|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
)
_VOCAB_MULTIPLE = 64


class ByteTokenizer:
    """Byte-level tokenizer; see the module docstring for the id layout."""

    def __init__(self) -> None:
        self.special_ids = {name: 256 + i for i, name in enumerate(_SPECIAL_TOKENS)}
        self.eos_id = self.special_ids["<|endoftext|>"]
        self.pad_id = self.special_ids["<|pad|>"]
        self.im_start_id = self.special_ids["<|im_start|>"]
        self.im_end_id = self.special_ids["<|im_end|>"]
        self.vision_start_id = self.special_ids["<|vision_start|>"]
        self.vision_end_id = self.special_ids["<|vision_end|>"]
        self.image_token_id = self.special_ids["<|image_pad|>"]
        used = 256 + len(_SPECIAL_TOKENS)
        self.vocab_size = -(-used // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE
        self._names = {i: name for name, i in self.special_ids.items()}

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode: argument 'text' must be a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes are decoded as UTF-8 (invalid sequences become U+FFFD); special and reserved ids as names."""
        pieces: list[str] = []
        pending = bytearray()
        for token in ids:
            token = int(token)
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"ByteTokenizer.decode: id {token} is outside [0, {self.vocab_size})")
            if token < 256:
                pending.append(token)
                continue
            pieces.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
            pieces.append(self._names.get(token, f"<|reserved_{token}|>"))
        pieces.append(pending.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def image_tokens(self, count: int) -> list[int]:
        """The placeholder run for one image whose merged grid has ``count`` tokens."""
        return [self.vision_start_id] + [self.image_token_id] * count + [self.vision_end_id]

    def encode_chat(
        self,
        messages: Sequence[dict],
        image_token_counts: Sequence[int] = (),
        add_generation_prompt: bool = False,
    ) -> tuple[list[int], list[bool]]:
        """Qwen chat format: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message.

        Every ``<image>`` in a content string becomes the placeholder run of the next image, whose merged token
        count is taken from ``image_token_counts`` in order. Returns ``(ids, is_answer)``: ``is_answer[i]`` is True
        on the tokens the model is trained to produce - an assistant message's content and its ``<|im_end|>``
        (so it learns to stop), not the role header and not the newline after ``<|im_end|>``.
        ``add_generation_prompt`` appends the ``<|im_start|>assistant\\n`` header that precedes an answer.
        """
        ids: list[int] = []
        is_answer: list[bool] = []
        images_used = 0
        for index, message in enumerate(messages):
            role, content = check_message(message, index)
            header = [self.im_start_id, *self.encode(role + "\n")]
            ids += header
            is_answer += [False] * len(header)
            body: list[int] = []
            for part_index, part in enumerate(content.split(IMAGE_PLACEHOLDER)):
                if part_index > 0:
                    if images_used >= len(image_token_counts):
                        raise ValueError(
                            f"ByteTokenizer.encode_chat: the messages contain more '{IMAGE_PLACEHOLDER}' "
                            f"placeholders than the {len(image_token_counts)} image token counts given"
                        )
                    body += self.image_tokens(int(image_token_counts[images_used]))
                    images_used += 1
                body += self.encode(part)
            body.append(self.im_end_id)
            ids += body
            is_answer += [role == "assistant"] * len(body)
            ids.append(self.encode("\n")[0])
            is_answer.append(False)
        if images_used != len(image_token_counts):
            raise ValueError(
                f"ByteTokenizer.encode_chat: {len(image_token_counts)} image token counts given but the messages "
                f"contain {images_used} '{IMAGE_PLACEHOLDER}' placeholders"
            )
        if add_generation_prompt:
            header = [self.im_start_id, *self.encode("assistant\n")]
            ids += header
            is_answer += [False] * len(header)
        return ids, is_answer

    def apply_chat(
        self,
        messages: Sequence[dict],
        image_token_counts: Sequence[int] = (),
        add_generation_prompt: bool = False,
    ) -> list[int]:
        """The ids of :meth:`encode_chat` alone."""
        return self.encode_chat(messages, image_token_counts, add_generation_prompt)[0]


def check_message(message: dict, index: int) -> tuple[str, str]:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise ValueError(f"chat message {index} must be a dict with 'role' and 'content', got {message!r}")
    role, content = message["role"], message["content"]
    if role not in CHAT_ROLES:
        raise ValueError(f"chat message {index}: role must be one of {CHAT_ROLES}, got {role!r}")
    if not isinstance(content, str):
        raise ValueError(f"chat message {index}: content must be a str, got {type(content).__name__}")
    return role, content


class HFTokenizer(ByteTokenizer):
    """A Hugging Face tokenizer (``transformers.AutoTokenizer`` of a local model folder) behind the
    :class:`ByteTokenizer` interface, for training a checkpoint on the vocabulary it was trained with.

    The special ids are the tokenizer's ids of Qwen's special tokens (``<|image_pad|>``, ``<|vision_start|>``,
    ``<|vision_end|>``, ``<|im_start|>``, ``<|im_end|>``); ``eos_id`` is the tokenizer's eos token (else
    ``<|endoftext|>``, else ``<|im_end|>``), ``pad_id`` its pad token (else the eos id). The chat format is
    inherited unchanged from :class:`ByteTokenizer` (Qwen's ``<|im_start|>role\\n...<|im_end|>\\n``, each piece
    between special tokens encoded on its own). As there, plain text never produces special ids: ``encode``
    splits special-token strings into ordinary tokens. ``vocab_size`` is ``len(tokenizer)``, which may be smaller
    than the model's embedding (Qwen pads its embedding to a round size).
    """

    def __init__(self, folder) -> None:
        from transformers import AutoTokenizer

        self.folder = str(folder)
        self.hf = AutoTokenizer.from_pretrained(self.folder)
        self.special_ids = {name: self._special_id(name) for name in _SPECIAL_TOKENS if name != "<|pad|>"
                            and self.hf.convert_tokens_to_ids(name) not in (None, self.hf.unk_token_id)}
        for required in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"):
            self._special_id(required)
        self.im_start_id = self.special_ids["<|im_start|>"]
        self.im_end_id = self.special_ids["<|im_end|>"]
        self.vision_start_id = self.special_ids["<|vision_start|>"]
        self.vision_end_id = self.special_ids["<|vision_end|>"]
        self.image_token_id = self.special_ids["<|image_pad|>"]
        fallback_eos = self.special_ids.get("<|endoftext|>", self.im_end_id)
        self.eos_id = fallback_eos if self.hf.eos_token_id is None else self.hf.eos_token_id
        self.pad_id = self.eos_id if self.hf.pad_token_id is None else self.hf.pad_token_id
        self.vocab_size = len(self.hf)

    def _special_id(self, token: str) -> int:
        found = self.hf.convert_tokens_to_ids(token)
        if found is None or found == self.hf.unk_token_id:
            raise ValueError(f"HFTokenizer: the tokenizer in {self.folder} has no special token {token!r}, which "
                             f"the Qwen chat and image format needs")
        return int(found)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"HFTokenizer.encode: argument 'text' must be a str, got {type(text).__name__}")
        return list(self.hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, folder) -> None:
        """Write the tokenizer files into ``folder`` (``save_pretrained``)."""
        self.hf.save_pretrained(folder)
