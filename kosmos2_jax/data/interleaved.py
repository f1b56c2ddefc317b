"""Interleaved image-text documents (the `interleaved` source kind): web pages with several images
in place, read from JSON lines in MMC4's or OBELICS' released layout, split into row-sized chunks.

    MMC4     {"text_list": ["Sentence one.", "Sentence two."],
              "image_info": [{"image_name": "a1b2.jpg", "matched_text_index": 1}, ...]}
    OBELICS  {"texts": ["A paragraph. Another sentence.", null, "More text."],
              "images": [null, "a1b2.jpg", null]}

A document becomes a list of parts in reading order: MMC4 puts each image before the sentence
it was matched to (images matched to one sentence keep their `image_info` order); OBELICS keeps
its positions (each has a text or an image) and splits paragraphs into sentences. Image names
are files under the source's `data_dir` (img2dataset's output folder: rewrite OBELICS' URLs to
the names it saved them under).

Chunks: `split_document` lays the parts out from the start, `<s>` first, each image an
`<image>` + slots + `</image>` block at its place, until the next part would overflow the row
(`seq_len`, one position kept for `</s>`) or bring its images past `max_images`: that part opens
the next chunk, so documents break at sentence and image boundaries only. A sentence longer than
a whole row is cut into row-sized token pieces. Only a document's last chunk ends in `</s>`; a
chunk with no text is dropped (nothing to learn). The loss covers text tokens (and `</s>`), never
`<s>`, the image blocks or padding. Rows hold several images, so interleaved sources need packed
rows (`data.pack`), whose `pack_max_images` is `max_images` here.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Iterator

import numpy as np

from kosmos2_jax.data.examples import BadRecord, ExampleConfig, decode_image, resize_pixels
from kosmos2_jax.format.processor import Kosmos2Processor
from kosmos2_jax.utils.errors import UsageError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def document_parts(doc: dict) -> list[tuple[str, str]]:
    """One JSON document -> [("text", sentence) | ("image", file name)] in reading order."""
    if "text_list" in doc:  # MMC4
        texts = [str(t) for t in doc.get("text_list") or []]
        before: dict[int, list[str]] = {}
        for info in doc.get("image_info") or []:
            index = info.get("matched_text_index")
            if not isinstance(index, int) or not 0 <= index < len(texts) or not info.get("image_name"):
                raise BadRecord("bad image_info", repr(info)[:200])
            before.setdefault(index, []).append(str(info["image_name"]))
        parts = []
        for i, text in enumerate(texts):
            parts += [("image", name) for name in before.get(i, [])]
            parts.append(("text", text))
    elif "texts" in doc and "images" in doc:  # OBELICS
        texts, images = doc["texts"] or [], doc["images"] or []
        if len(texts) != len(images):
            raise BadRecord("bad document", f"{len(texts)} texts but {len(images)} images")
        parts = []
        for text, image in zip(texts, images):
            if image:
                parts.append(("image", str(image)))
            elif text:
                parts += [("text", s) for s in _SENTENCE_END.split(str(text))]
    else:
        raise BadRecord("unknown document layout", f"keys {sorted(doc)[:8]} (MMC4: text_list, OBELICS: texts/images)")
    parts = [(kind, value) for kind, value in parts if kind == "image" or value.strip()]
    if not any(kind == "text" for kind, _ in parts):
        raise BadRecord("document with no text")
    return parts


def split_document(parts: list[tuple[str, str]], processor: Kosmos2Processor, seq_len: int,
                   max_images: int) -> list[dict]:
    """Parts -> chunks `{"parts": [("text", ids) | ("image", name)], "last": bool}`, each fitting a
    row of `seq_len` with at most `max_images` images (module docstring)."""
    block = processor.num_image_tokens + 2
    room = seq_len - 2  # <s> and </s>
    if room < block + 1:
        raise UsageError(f"seq_len {seq_len} leaves no room for text after one image ({block} tokens)")
    chunks, current, used, images = [], [], 0, 0

    def close():
        nonlocal current, used, images
        if any(kind == "text" for kind, _ in current):
            chunks.append({"parts": current, "last": False})
        current, used, images = [], 0, 0

    for kind, value in parts:
        if kind == "image":
            if used + block > room or images == max_images:
                close()
            current.append(("image", value))
            used, images = used + block, images + 1
            continue
        ids = processor.tokenizer.encode(value.strip())
        if used + len(ids) > room and used:
            close()
        while len(ids) > room - used:  # longer than what is left of a fresh row: cut at the row
            current.append(("text", ids[:room - used]))
            ids = ids[room - used:]
            used = room
            close()
        if ids:
            current.append(("text", ids))
            used += len(ids)
    close()
    if chunks:
        chunks[-1]["last"] = True
    return chunks


def interleaved_example(chunk: dict, image_dir: str, processor: Kosmos2Processor, config: ExampleConfig) -> dict:
    """A chunk -> an example whose `pixel_values` are [k, S, S, 3] uint8 (its k images in order)
    and `has_image` = k; loss on the text tokens and the document's `</s>` only."""
    if "bad" in chunk:
        raise BadRecord(chunk["bad"])
    tok = processor.tokenizer
    ids, loss, slots, pixels = [tok.bos_id], [0], [0], []
    for kind, value in chunk["parts"]:
        if kind == "image":
            path = os.path.join(image_dir, value)
            data = open(path, "rb").read() if os.path.isfile(path) else b""
            pixels.append(resize_pixels(decode_image(data), processor.image_size, config.preprocess))
            block = [tok.image_id, *processor.image_slot_ids, tok.end_image_id]
            ids += block
            loss += [0] * len(block)
            slots += [0] + [1] * processor.num_image_tokens + [0]
        else:
            ids += list(value)
            loss += [1] * len(value)
            slots += [0] * len(value)
    if chunk["last"]:
        ids, loss, slots = ids + [tok.eos_id], loss + [1], slots + [0]
    if len(ids) > config.seq_len:
        raise UsageError(f"a chunk of {len(ids)} tokens for rows of {config.seq_len}: split with the same seq_len")
    n, size = len(ids), processor.image_size
    rows = np.zeros((4, config.seq_len), np.int32)
    rows[0] = tok.pad_id
    rows[0, :n], rows[1, :n], rows[2, :n], rows[3, :n] = ids, 1, loss, slots
    images = np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)
    return {"input_ids": rows[0], "attention_mask": rows[1], "loss_mask": rows[2],
            "image_embeds_position_mask": rows[3], "pixel_values": images, "has_image": np.int32(len(pixels))}


def document_files(path: str) -> list[str]:
    """A JSON-lines file, or a folder of them (`*.jsonl`, `*.json`, sorted)."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.jsonl")) + glob.glob(os.path.join(path, "*.json")))
        if not files:
            raise FileNotFoundError(f"no *.jsonl documents in {path!r}")
        return files
    if not os.path.isfile(path):
        raise FileNotFoundError(f"interleaved documents not found: {path!r}")
    return [path]


def interleaved_chunks(path: str, processor: Kosmos2Processor, seq_len: int, max_images: int,
                       process_index: int = 0, process_count: int = 1, skip: int = 0,
                       repeat: bool = True) -> Iterator[dict]:
    """This host's chunks (documents i with i % process_count == process_index, in file order),
    after the first `skip` (a resume replays the reading and splitting, not the image decoding).
    A bad document yields one `{"bad": reason}` in place of its chunks."""
    files, produced = document_files(path), 0
    while True:
        doc_index, any_mine = 0, False
        for name in files:
            with open(name, encoding="utf-8") as f:
                for line in f:
                    if not line.strip():
                        continue
                    mine = doc_index % process_count == process_index
                    doc_index += 1
                    if not mine:
                        continue
                    any_mine = True
                    try:
                        chunks = split_document(document_parts(json.loads(line)), processor, seq_len, max_images)
                    except json.JSONDecodeError:
                        chunks = [{"bad": "bad json"}]
                    except BadRecord as e:
                        chunks = [{"bad": e.reason}]
                    for chunk in chunks:
                        if produced >= skip:
                            yield chunk
                        produced += 1
        if not any_mine:
            raise UsageError(f"no interleaved documents for host {process_index} of {process_count} in {path!r}")
        if not repeat:
            return
