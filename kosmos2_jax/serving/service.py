"""Grounded generation as a service: the web demo's four tasks as requests, each checked on its
own, batched into few `generate` calls, answered with the same record `predict --json` writes.

    service = Service.load("ckpt/kosmos2", "sentencepiece.bpe.model", batch_sizes=(1, 8))
    service.warm_up([describe(image, "brief")])      # compile before the first user waits
    [record] = service.run([describe(image, "brief")])

A bad request (no image, a huge one, an empty prompt, a box outside the image, a prompt longer
than the position table) becomes a `RequestError` in its own slot of `run`'s answer; the other
requests of the batch are answered. Requests share one `generate` call when their decoding
settings match and their prompts fill the same length bucket, so every row is laid out exactly
as it would be alone (sampling requests run alone: their random numbers depend on the batch).
A batch is padded to the next of `batch_sizes` by repeating its last row: a few programs serve
any number of concurrent requests.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import time
from typing import Sequence

import jax
import numpy as np
from PIL import Image

from kosmos2_jax.format import boxes as box_rules
from kosmos2_jax import weights
from kosmos2_jax.inference.generate import bucket_length, generate, prepare, shard_params
from kosmos2_jax.format.grounding import entity_records
from kosmos2_jax.models import Kosmos2
from kosmos2_jax.format.processor import Kosmos2Processor, processor_for
from kosmos2_jax.utils.errors import UsageError

DESCRIBE_PROMPTS = {"brief": "<grounding>An image of", "detailed": "<grounding>Describe this image in detail:"}
GROUND_PROMPT = "<grounding><phrase>{phrase}</phrase>"
REFER_PROMPT = "<grounding><phrase> It</phrase> is"  # the region's box follows the phrase (REG's format)
ASK_PROMPT = "<grounding> Question: {question} Answer:"
GROUND_MAX_NEW_TOKENS = 16  # a phrase's boxes: <object>, pairs of location tokens, </object>
PROMPT_BUCKET = 8  # as `predict`: a request's ids equal predict's on the same image and prompt
STRATEGIES = ("greedy", "beam", "sample")
MAX_PIXELS = 40_000_000


class RequestError(UsageError):
    """A request the service cannot answer; the message says why, for the page."""


@dataclasses.dataclass(frozen=True)
class Decoding:
    strategy: str = "greedy"  # greedy | beam | sample
    max_new_tokens: int = 128
    no_repeat_ngram_size: int = 3  # the released model's setting; 0: no blocking
    num_beams: int = 3  # beam
    temperature: float = 1.0  # sample
    top_p: float = 0.9  # sample
    seed: int = 0  # sample

    def checked(self) -> "Decoding":
        if self.strategy not in STRATEGIES:
            raise RequestError(f"decoding strategy {self.strategy!r}: expected one of {', '.join(STRATEGIES)}")
        for name, low in (("max_new_tokens", 1), ("no_repeat_ngram_size", 0), ("num_beams", 1)):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < low:
                raise RequestError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.strategy == "sample" and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise RequestError(f"sampling needs temperature > 0 and 0 < top_p <= 1 "
                               f"(got {self.temperature}, {self.top_p})")
        return self

    def options(self, tokenizer) -> dict:
        """`generate`'s keyword arguments (the rng aside)."""
        beams = self.num_beams if self.strategy == "beam" else 1
        sample = self.strategy == "sample"
        return dict(max_new_tokens=int(self.max_new_tokens), num_beams=int(beams), do_sample=sample,
                    temperature=float(self.temperature) if sample else 1.0,
                    top_p=float(self.top_p) if sample else 1.0,
                    no_repeat_ngram_size=int(self.no_repeat_ngram_size), eos_token_id=tokenizer.eos_id,
                    pad_token_id=tokenizer.pad_id, bucket=PROMPT_BUCKET)


@dataclasses.dataclass(frozen=True)
class Request:
    task: str  # describe | ground | refer | ask
    image: Image.Image | None
    prompt: str
    boxes: tuple = ()  # normalized boxes, one per `<phrase>` of the prompt that has one
    decoding: Decoding = Decoding()
    subject: str = ""  # ground: the phrase
    problem: str | None = None  # set by a builder: the request is refused with this message


def _refusable(task: str):
    """A request builder whose RequestError becomes a request refused with its message: a bad input
    is answered in its own slot of `Service.run`, never raised into the batch."""
    def wrap(build):
        @functools.wraps(build)
        def builder(*args, **kwargs) -> Request:
            try:
                return build(*args, **kwargs)
            except RequestError as e:
                return Request(task, None, "", problem=str(e))
        return builder
    return wrap


def _checked_image(image) -> Image.Image:
    """An RGB image; RequestError says why not."""
    if image is None:
        raise RequestError("no image: upload one")
    if isinstance(image, str):  # the web app passes an upload it could not open as its message
        raise RequestError(image)
    if not isinstance(image, Image.Image):
        raise RequestError(f"not an image: {type(image).__name__}")
    w, h = image.size
    if w * h > MAX_PIXELS:
        raise RequestError(f"the image is {w}x{h} ({w * h / 1e6:.0f} megapixels); the limit is {MAX_PIXELS / 1e6:.0f}")
    if w < 1 or h < 1:
        raise RequestError(f"the image is {w}x{h}: empty")
    return image.convert("RGB")


def _text(value, missing: str) -> str:
    """`value` stripped; RequestError `missing` when nothing is left."""
    text = "" if value is None else str(value).strip()
    if not text:
        raise RequestError(missing)
    return text


@_refusable("describe")
def describe(image, prompt: str = DESCRIBE_PROMPTS["brief"], decoding: Decoding = Decoding()) -> Request:
    """A grounded caption continuing `prompt` (the released model's: DESCRIBE_PROMPTS)."""
    image = _checked_image(image)
    _text(prompt, "empty prompt: write one (e.g. <grounding>An image of)")
    return Request("describe", image, str(prompt), decoding=decoding)


@_refusable("ground")
def ground(image, phrase: str, decoding: Decoding = Decoding()) -> Request:
    """The boxes of one phrase (the paper's phrase grounding prompt)."""
    image = _checked_image(image)
    phrase = _text(phrase, "empty phrase: write what to find")
    if "<" in phrase or ">" in phrase:
        raise RequestError(f"phrase {phrase!r}: '<' and '>' are reserved for the model's tags")
    decoding = dataclasses.replace(decoding, max_new_tokens=min(decoding.max_new_tokens, GROUND_MAX_NEW_TOKENS))
    return Request("ground", image, GROUND_PROMPT.format(phrase=phrase), decoding=decoding, subject=phrase)


def parse_pixel_box(text: str, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """`"x1, y1, x2, y2"` in pixels of an image of `size` (w, h) -> a normalized box; RequestError
    names what is wrong."""
    try:
        values = [float(v) for v in str(text).replace(",", " ").split()]
    except ValueError:
        raise RequestError(f"box {text!r}: expected 4 pixel coordinates x1, y1, x2, y2") from None
    if len(values) != 4:
        raise RequestError(f"box {text!r}: expected 4 pixel coordinates x1, y1, x2, y2, got {len(values)}")
    w, h = size
    x1, y1, x2, y2 = values
    if min(values) < 0 or x2 > w or y2 > h or x1 > w or y1 > h:
        raise RequestError(f"box {text!r} is outside the {w}x{h} image")
    box = (x1 / w, y1 / h, x2 / w, y2 / h)
    problem = box_rules.box_problem(box)
    if problem:
        raise RequestError(f"box {text!r}: {box_rules.PROBLEMS[problem]}")
    return box


@_refusable("refer")
def refer(image, box: str, decoding: Decoding = Decoding()) -> Request:
    """A description of the region `box` (pixels "x1, y1, x2, y2")."""
    image = _checked_image(image)
    box = _text(box, "no region: click two corners on the image (or type x1, y1, x2, y2)")
    return Request("refer", image, REFER_PROMPT, boxes=(parse_pixel_box(box, image.size),), decoding=decoding)


@_refusable("ask")
def ask(image, question: str, decoding: Decoding = Decoding()) -> Request:
    """Grounded VQA: `<grounding> Question: ... Answer:`."""
    image = _checked_image(image)
    question = _text(question, "empty question: write one")
    return Request("ask", image, ASK_PROMPT.format(question=question), decoding=decoding)


@dataclasses.dataclass
class _Row:
    index: int  # in the caller's list
    request: Request
    inputs: dict  # the processor's arrays for this one row


class Service:
    """A model, its tokenizer and processor, and the batching rules above."""

    def __init__(self, model: Kosmos2, params, processor: Kosmos2Processor, name: str,
                 batch_sizes: Sequence[int] = (1, 8), decode_mode: str = "auto", tokens_per_call: int = 32,
                 mesh=None):
        sizes = sorted({int(b) for b in batch_sizes})
        if not sizes or sizes[0] < 1:
            raise UsageError(f"batch sizes must be integers >= 1, got {list(batch_sizes)}")
        if mesh is not None:  # decode sharded over the mesh's devices
            params = shard_params(model, params, mesh)
        self.model, self.params, self.processor, self.name = model, params, processor, name
        self.batch_sizes = tuple(sizes)
        self.decode_options = dict(decode_mode=decode_mode, tokens_per_call=tokens_per_call, mesh=mesh)
        self._lock = threading.Lock()  # one generate call at a time (the device is shared)

    @classmethod
    def load(cls, checkpoint: str, tokenizer: str, batch_sizes: Sequence[int] = (1, 8), **decode_options) -> "Service":
        """`decode_options`: generate's `decode_mode`, `tokens_per_call` and `mesh`."""
        model, params = weights.load_model(checkpoint, **weights.DECODING)
        processor = processor_for(tokenizer, model)
        return cls(model, params, processor, os.path.normpath(checkpoint), batch_sizes, **decode_options)

    @property
    def grid(self) -> int:
        return self.processor.num_bins

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    def _row(self, index: int, request: Request) -> _Row:
        """The request's processed inputs; RequestError when it cannot be answered."""
        if request.problem:
            raise RequestError(request.problem)
        decoding = request.decoding.checked()
        tok = self.processor.tokenizer
        unknown = tok.unknown_characters(request.prompt)
        if unknown:
            raise RequestError(f"the tokenizer cannot encode {' '.join(repr(c) for c in unknown)} "
                               f"(they would be dropped)")
        inputs = self.processor([request.prompt], images=[request.image],
                                bboxes=[list(request.boxes)] if request.boxes else None)
        length = int(inputs["input_ids"].shape[1])
        limit = self.model.config.text.max_position_embeddings
        if length + decoding.max_new_tokens > limit:
            raise RequestError(f"the prompt is {length} tokens; with max_new_tokens={decoding.max_new_tokens} "
                               f"it exceeds the model's {limit} positions")
        return _Row(index, request, inputs)

    def _rows(self, requests: Sequence[Request]) -> tuple[list[_Row], dict[int, RequestError]]:
        rows, refused = [], {}
        for i, request in enumerate(requests):
            try:
                rows.append(self._row(i, request))
            except RequestError as e:
                refused[i] = e
        return rows, refused

    def _groups(self, rows: list[_Row]) -> list[list[_Row]]:
        """Rows that can share a generate call, in chunks of at most the largest batch size."""
        groups: dict[tuple, list[_Row]] = {}
        for row in rows:
            d = row.request.decoding
            key = (d if d.strategy != "sample" else (d, row.index),
                   bucket_length(row.inputs["input_ids"].shape[1], PROMPT_BUCKET))
            groups.setdefault(key, []).append(row)
        return [group[i:i + self.max_batch] for group in groups.values()
                for i in range(0, len(group), self.max_batch)]

    def _batch_inputs(self, rows: list[_Row]) -> dict:
        """The rows left-padded to one length, repeated up to the next batch size."""
        size = next(b for b in self.batch_sizes if b >= len(rows))
        rows = rows + [rows[-1]] * (size - len(rows))
        length = max(r.inputs["input_ids"].shape[1] for r in rows)
        pads = {"input_ids": self.processor.tokenizer.pad_id, "attention_mask": 0, "image_embeds_position_mask": 0}
        batch = {key: np.concatenate([np.pad(r.inputs[key], ((0, 0), (length - r.inputs[key].shape[1], 0)),
                                             constant_values=pad) for r in rows]) for key, pad in pads.items()}
        batch["pixel_values"] = np.concatenate([r.inputs["pixel_values"] for r in rows])
        return batch

    def _options(self, decoding: Decoding) -> dict:
        options = dict(decoding.options(self.processor.tokenizer), **self.decode_options)
        if decoding.strategy == "sample":
            options["rng"] = jax.random.PRNGKey(int(decoding.seed))
        return options

    def warm_up(self, requests: Sequence[Request], progress=print) -> int:
        """Compile the programs these requests need at every batch size; returns how many."""
        rows, refused = self._rows(requests)
        for i, e in refused.items():  # e.g. a tokenizer without the example's characters
            progress(f"not compiled: {requests[i].task} {requests[i].prompt!r}: {e} (the page answers so)")
        seen, count = set(), 0
        for row in rows:
            for size in self.batch_sizes:
                inputs = self._batch_inputs([row] * size)
                key = (row.request.decoding, size, bucket_length(inputs["input_ids"].shape[1], PROMPT_BUCKET))
                if key in seen:
                    continue
                seen.add(key)
                start = time.perf_counter()
                prepare(self.model, self.params, inputs, **self._options(row.request.decoding))
                count += 1
                progress(f"compiled {row.request.task} (batch {size}, prompt {key[2]} tokens) "
                         f"in {time.perf_counter() - start:.1f}s")
        return count

    def run(self, requests: Sequence[Request]) -> list[dict | RequestError]:
        """Each request's record (`predict --json`'s, with `seconds` and `batch`), or its error."""
        out: list = [None] * len(requests)
        rows, refused = self._rows(requests)
        for i, e in refused.items():
            out[i] = e
        for group in self._groups(rows):
            try:
                for row, record in zip(group, self._generate(group)):
                    out[row.index] = record
            except Exception as e:  # noqa: BLE001 - one failed call must not take the server down
                for row in group:
                    out[row.index] = RequestError(f"generation failed: {type(e).__name__}: {e}")
        return out

    def _generate(self, rows: list[_Row]) -> list[dict]:
        inputs = self._batch_inputs(rows)
        with self._lock:
            start = time.perf_counter()
            result = generate(self.model, self.params, inputs, **self._options(rows[0].request.decoding))
            seconds = time.perf_counter() - start
        records = []
        for row, ids in zip(rows, result.sequences):
            raw = self.processor.decode(ids)
            clean, entities = self.processor.post_process_generation(raw)
            w, h = row.request.image.size
            records.append({"task": row.request.task, "prompt": row.request.prompt,
                            "text": self.processor.post_process_generation(raw, False), "clean_text": clean,
                            "entities": entity_records(entities, w, h), "image_size": [w, h],
                            "seconds": round(seconds, 4), "batch": len(rows)})
        return records
