"""Real data: JSONL files, one sample per line.

``{"messages": [{"role": "user", "content": "<image>What is shown?"}, {"role": "assistant", "content": "..."}],
"images": ["imgs/a.png"], "tags": ["vertical", "cockpit"]}``

``images`` are paths relative to the JSONL file (or absolute), consumed by the ``<image>`` placeholders in
order; they are opened lazily when a sample is encoded. ``tags`` is the sample's tag path (joined with "/",
here ``"vertical/cockpit"``), the key the curriculum mixes on; lines without ``tags`` get ``default_tag``.
"""

from __future__ import annotations

import json
from pathlib import Path

from mgpt_train.data.sample import Sample


def load_jsonl(path: str | Path, default_tag: str | None = None) -> list[Sample]:
    """All samples of one JSONL file; any malformed line raises ``ValueError`` naming ``file:line``."""
    path = Path(path)
    samples = []
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    samples.append(_parse_line(line, path.parent, default_tag))
                except ValueError as error:
                    raise ValueError(f"{path}:{line_number}: {error}") from error
    return samples


def _parse_line(line: str, base: Path, default_tag: str | None) -> Sample:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON ({error})") from error
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise ValueError("each line must be an object with a 'messages' list")
    image_names = record.get("images", [])
    if not isinstance(image_names, list) or not all(isinstance(name, str) for name in image_names):
        raise ValueError(f"'images' must be a list of paths, got {image_names!r}")
    images = [base / name for name in image_names]
    missing = [str(image) for image in images if not image.is_file()]
    if missing:
        raise ValueError(f"image files not found: {missing}")
    tags = record.get("tags")
    if tags is None:
        if default_tag is None:
            raise ValueError("no 'tags' on this line and no default_tag given")
        tag = default_tag
    elif isinstance(tags, list) and tags and all(isinstance(part, str) and part for part in tags):
        tag = "/".join(tags)
    else:
        raise ValueError(f"'tags' must be a non-empty list of non-empty strings, got {tags!r}")
    return Sample(messages=record["messages"], images=images, tag=tag)
