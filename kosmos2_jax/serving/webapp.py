"""The web demo's page: four tabs over a `serving.Service`, built with Gradio Blocks.

Describe (grounded caption), Ground (phrases -> boxes), Refer (a region -> its description; the
region is picked by clicking two corners on the image, or typed as pixels) and Ask (grounded VQA).
Each tab's button is one queued, batched endpoint (`/describe`, `/ground`, `/refer`, `/ask`):
concurrent requests reach `Service.run` together, one batch at a time. Every answer comes with a
status line: the time of the batch it ran in and its size, or the reason the request was refused.
The page loads nothing from outside the server (system fonts, no analytics).
"""

from __future__ import annotations

import os
from typing import Sequence

import gradio as gr
from PIL import Image

from kosmos2_jax.serving import service as serving
from kosmos2_jax.format.visualize import entity_colours

DISPLAY_SIDE = 1024  # images are shown at most this large (boxes scaled with them)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
# no web fonts: the page renders with no internet
FONTS = dict(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def Slider(*args, **kwargs):  # noqa: N802 - used as the component it wraps
    """A `gr.Slider` whose out-of-range value (from the API) is refused to the caller with Gradio's
    message, without a traceback in the server's console for each such request (wrapped, not
    subclassed: see `uploaded_image`)."""
    slider = gr.Slider(*args, **kwargs)
    preprocess = slider.preprocess

    def quiet(payload):
        try:
            return preprocess(payload)
        except gr.Error as e:
            raise gr.Error(e.message, print_exception=False) from None

    slider.preprocess = quiet
    return slider


def example_images(folder: str | None, limit: int = 8) -> list[str]:
    """The image files of `folder` (sorted, at most `limit`); none when it is absent."""
    if not folder or not os.path.isdir(folder):
        return []
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
    return [os.path.join(folder, n) for n in names[:limit]]


def _display(image: Image.Image, records: Sequence[dict]):
    """The annotated image: a display-sized copy, each entity's pixel boxes scaled to it, in the
    colours of `predict`'s drawings (the same as the highlighted text's)."""
    w, h = image.size
    scale = min(1.0, DISPLAY_SIDE / max(w, h))
    shown = image if scale == 1.0 else image.resize((max(1, round(w * scale)), max(1, round(h * scale))))
    boxes = []
    for entity in records:
        for x1, y1, x2, y2 in entity["boxes"]:
            boxes.append(((round(x1 * scale), round(y1 * scale), round(x2 * scale), round(y2 * scale)),
                          entity["phrase"]))
    return gr.AnnotatedImage(value=(shown, boxes), color_map=_colour_map([e["phrase"] for e in records]))


def _highlighted(text: str, records: Sequence[dict]):
    """The text cut at the entities' spans, each entity in its colour."""
    pieces, pos = [], 0
    for entity in sorted(records, key=lambda e: e["span"][0]):
        start, end = entity["span"]
        if start < pos or end <= start:
            continue
        if start > pos:
            pieces.append((text[pos:start], None))
        pieces.append((text[start:end], entity["phrase"]))
        pos = end
    if pos < len(text):
        pieces.append((text[pos:], None))
    return gr.HighlightedText(value=pieces, color_map=_colour_map([e["phrase"] for e in records]))


def _colour_map(labels: Sequence[str]) -> dict[str, str]:
    unique = list(dict.fromkeys(labels))
    return {label: "#%02x%02x%02x" % c for label, c in zip(unique, entity_colours(len(unique)))}


def status_line(record: dict | serving.RequestError, service: serving.Service, found: str | None = None) -> str:
    """The batch's time and size and what was found (default: the record's entities), or the error."""
    if isinstance(record, serving.RequestError):
        return f"**Error:** {record}"
    n = len(record.get("entities", ()))
    return (f"{record['seconds']:.2f} s for a batch of {record['batch']} · "
            f"{found or f'{n} entit' + ('y' if n == 1 else 'ies')} · `{service.name}`")


def _answer(request: serving.Request, record, service, text_of=None):
    """(annotated image, highlighted text, JSON, status) for one request."""
    if isinstance(record, serving.RequestError):
        return None, None, {"error": str(record)}, status_line(record, service)
    text = text_of(record) if text_of else record["clean_text"]
    shift = len(record["clean_text"]) - len(text)  # entity spans count from the clean text's start
    shown = [dict(e, span=[e["span"][0] - shift, e["span"][1] - shift]) for e in record["entities"]]
    return (_display(request.image, record["entities"]), _highlighted(text, [e for e in shown if e["span"][0] >= 0]),
            record, status_line(record, service))


def _entity_text(label: str, elem_id: str):
    """The text with its entities highlighted (the entity is the text: no category tag)."""
    return gr.HighlightedText(label=label, elem_id=elem_id, combine_adjacent=True, show_inline_category=False)


def uploaded_image(**kwargs):
    """A `gr.Image` whose bad upload (not an image, a decompression bomb) reaches the request as
    its message instead of failing the whole batch in Gradio's preprocessing. (Wrapped, not
    subclassed: Gradio writes a .pyi file next to any module that subclasses a component.)"""
    image = gr.Image(type="pil", image_mode="RGB", **kwargs)
    preprocess = image.preprocess

    def tolerant(payload):
        try:
            return preprocess(payload)
        except Exception as e:  # noqa: BLE001 - any undecodable upload
            name = getattr(payload, "orig_name", None) or "the upload"
            return f"{name} is not an image this server can read ({type(e).__name__})"

    image.preprocess = tolerant
    return image


def _decoding(strategy, max_new_tokens, no_repeat_ngram_size, num_beams, temperature, top_p, seed):
    def whole(v):
        return int(v) if isinstance(v, (int, float)) and float(v).is_integer() else v
    return serving.Decoding(str(strategy), whole(max_new_tokens), whole(no_repeat_ngram_size), whole(num_beams),
                            float(temperature), float(top_p), whole(seed))


def build_app(service: serving.Service, examples: Sequence[str] = (),
              prompts: Sequence[str] = tuple(serving.DESCRIBE_PROMPTS.values())):
    """The Gradio Blocks app (not launched). `prompts`: the Describe tab's choices (any other
    prompt can be typed)."""
    def answer_batch(requests, text_of=None):
        records = service.run(requests)
        rows = [_answer(r, rec, service, text_of) for r, rec in zip(requests, records)]
        return [list(column) for column in zip(*rows)]

    def decodings(settings):
        out = []
        for values in zip(*settings):
            try:
                out.append(_decoding(*values))
            except (TypeError, ValueError) as e:
                out.append(serving.Decoding(strategy=f"unreadable settings ({e})"))
        return out

    def describe_fn(images, prompts, *settings):
        return answer_batch([serving.describe(im, p, d) for im, p, d in zip(images, prompts, decodings(settings))])

    def refer_fn(images, regions, *settings):
        return answer_batch([serving.refer(im, b, d) for im, b, d in zip(images, regions, decodings(settings))],
                            text_of=lambda rec: rec["clean_text"])

    def ask_fn(images, questions, *settings):
        def answer_only(record):  # the text after "Answer:"
            text = record["clean_text"]
            cut = text.find("Answer:")
            return text[cut + len("Answer:"):].lstrip() if cut >= 0 else text
        return answer_batch([serving.ask(im, q, d) for im, q, d in zip(images, questions, decodings(settings))],
                            text_of=answer_only)

    def ground_fn(images, phrase_lists, *settings):
        # each phrase is its own row (one batch for all phrases of all requests); one answer per request
        requests, owners = [], []
        for k, (image, phrases, decoding) in enumerate(zip(images, phrase_lists, decodings(settings))):
            names = [p.strip() for p in str(phrases or "").replace("\n", ";").split(";") if p.strip()]
            for name in names or [""]:
                requests.append(serving.ground(image, name, decoding))
                owners.append(k)
        records = service.run(requests)
        out = []
        for k, image in enumerate(images):
            mine = [(r, rec) for r, rec, o in zip(requests, records, owners) if o == k]
            errors = [rec for _, rec in mine if isinstance(rec, serving.RequestError)]
            if errors:
                error = errors[0]
                out.append((None, {"error": str(error)}, status_line(error, service)))
                continue
            phrases = []
            for request, record in mine:
                phrase = request.subject
                found = [e for e in record["entities"] if e["phrase"] == phrase]
                phrases.append({"phrase": phrase, "boxes": [b for e in found for b in e["boxes"]],
                                "boxes_normalized": [b for e in found for b in e["boxes_normalized"]],
                                "text": record["text"]})
            first = mine[0][1]
            record = {"task": "ground", "phrases": phrases, "image_size": first["image_size"],
                      "seconds": first["seconds"], "batch": first["batch"]}
            found = f"{sum(bool(p['boxes']) for p in phrases)}/{len(phrases)} phrases found"
            status = status_line(record, service, found)
            out.append((_display(mine[0][0].image, phrases), record, status))
        return [list(column) for column in zip(*out)]

    def pick_corner(image, corner, evt: gr.SelectData):
        """First click: one corner; second click: the box (x1, y1, x2, y2 in pixels)."""
        x, y = (int(v) for v in evt.index[:2])
        if corner is None:
            return (x, y), f"{x}, {y}, ?, ? (click the opposite corner)"
        (x0, y0), corner = corner, None
        return corner, f"{min(x0, x)}, {min(y0, y)}, {max(x0, x)}, {max(y0, y)}"

    title = (f"### KOSMOS-2 · `{service.name}` · {service.grid}×{service.grid} location grid · "
             f"batches of {', '.join(map(str, service.batch_sizes))}")
    with gr.Blocks(title="KOSMOS-2 demo", analytics_enabled=False) as app:
        gr.Markdown(title)
        with gr.Accordion("Decoding", open=False):
            with gr.Row():
                strategy = gr.Radio(list(serving.STRATEGIES), value="greedy", label="strategy")
                max_new = Slider(1, 512, value=128, step=1, label="max new tokens")
                ngram = Slider(0, 6, value=3, step=1, label="no-repeat n-gram size (0: off)")
            with gr.Row():
                beams = Slider(1, 8, value=3, step=1, label="beams (beam)")
                temperature = Slider(0.05, 2.0, value=1.0, step=0.05, label="temperature (sample)")
                top_p = Slider(0.05, 1.0, value=0.9, step=0.05, label="top-p (sample)")
                seed = gr.Number(0, precision=0, label="seed (sample)")
        settings = [strategy, max_new, ngram, beams, temperature, top_p, seed]
        batching = dict(batch=True, max_batch_size=service.max_batch, concurrency_id="model", concurrency_limit=1)

        def tab(title, key, field, button, fn, boxes_label, text_label=None, image_label="image", fixed=""):
            """image + one field -> (annotated image[, highlighted text], JSON, status): one endpoint.
            `fixed`: the tab's own prompt words; said up front when the tokenizer cannot write them."""
            with gr.Tab(title):
                unknown = service.processor.tokenizer.unknown_characters(fixed) if fixed else []
                if unknown:
                    gr.Markdown(f"**This model's tokenizer cannot write this tab's prompt** (`{fixed}`: "
                                f"{' '.join(repr(c) for c in unknown)}): its requests are refused.",
                                elem_id=f"{key}-warning")
                with gr.Row():
                    with gr.Column():
                        image = uploaded_image(label=image_label, elem_id=f"{key}-image")
                        field = field()
                        run = gr.Button(button, variant="primary", elem_id=f"{key}-button")
                    with gr.Column():
                        outputs = [gr.AnnotatedImage(label=boxes_label, elem_id=f"{key}-boxes")]
                        if text_label:
                            outputs.append(_entity_text(text_label, f"{key}-text"))
                        status = gr.Markdown(elem_id=f"{key}-status")
                        outputs += [gr.JSON(label="JSON"), status]
                run.click(fn, [image, field, *settings], outputs, api_name=key, **batching)
            return image, field

        d_image, _ = tab("Describe", "describe", lambda: gr.Dropdown(list(prompts), value=prompts[0], allow_custom_value=True,
                                                        label="prompt"),
            "Describe", describe_fn, "entities", "caption")
        g_image, _ = tab("Ground", "ground", lambda: gr.Textbox(label="phrases (one per line, or separated by ;)", lines=2),
            "Ground", ground_fn, "boxes", fixed=serving.GROUND_PROMPT.format(phrase=""))
        corner = gr.State(None)
        r_image, r_box = tab("Refer", "refer", lambda: gr.Textbox(label="region x1, y1, x2, y2 (pixels)",
                                                                  elem_id="refer-box"),
                             "Describe the region", refer_fn, "region and entities", "description",
                             image_label="image: click two corners of a region", fixed=serving.REFER_PROMPT)
        # page-only listeners: not endpoints of the API (Gradio 6 would take api_name=False as a name)
        r_image.select(pick_corner, [r_image, corner], [corner, r_box], api_visibility="private")
        r_image.upload(lambda: (None, ""), None, [corner, r_box], api_visibility="private")
        a_image, _ = tab("Ask", "ask", lambda: gr.Textbox(label="question", value="What is in the image?"),
                         "Ask", ask_fn, "entities", "answer", fixed=serving.ASK_PROMPT.format(question=""))
        if examples:
            # One gallery under the tabs, not gr.Examples in each: Gradio 6 draws the examples of a
            # tab that is not shown at page load as empty 2 px items (Chromium).
            gallery = gr.Gallery(list(examples), label="examples: click one to put it in every tab", columns=8,
                                 height="auto", allow_preview=False, elem_id="examples")

            def pick(evt: gr.SelectData):
                return [examples[evt.index]] * 4 + [None, ""]

            gallery.select(pick, None, [d_image, g_image, r_image, a_image, corner, r_box], api_visibility="private")
    return app


def warm_up_requests(prompts: Sequence[str] = tuple(serving.DESCRIBE_PROMPTS.values())) -> list[serving.Request]:
    """What the page asks with its defaults: the programs compiled before the first visitor."""
    blank = Image.new("RGB", (224, 224), (127, 127, 127))
    return [*(serving.describe(blank, p) for p in prompts),
            serving.ground(blank, "a dog"), serving.refer(blank, "10, 10, 100, 100"),
            serving.ask(blank, "What is in the image?")]


def launch(app, host: str, port: int, max_file_size: str = "50mb", block: bool = True):
    """Serve `app` with the queue; returns once it listens when `block` is False."""
    app.queue(default_concurrency_limit=1)
    return app.launch(server_name=host, server_port=port, max_file_size=max_file_size, show_error=True,
                      prevent_thread_lock=not block, theme=gr.themes.Default(**FONTS), footer_links=["api"],
                      quiet=False)
