"""The web demo as users run it: `python -m kosmos2_jax.serve` in a subprocess, its four endpoints
through `gradio_client`, its page in a real headless Chromium (Debian's, driven by Playwright).

The checkpoint is a tiny model that memorized one grounded caption (a few seconds of Adam here),
so that Describe has entities to show; its tokenizer covers the page's default prompts."""

import os
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

gr_client = pytest.importorskip("gradio_client")
pytest.importorskip("gradio")

from conftest import REPO, save_tiny_checkpoint  # noqa: E402
from kosmos2_jax import predict
from kosmos2_jax.format import grounding  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from serve_batching import DECODING, measure, start_server  # noqa: E402

CAPTION = ("<grounding>An image of<phrase> a red circle</phrase><object><patch_index_0066><patch_index_0500>"
           "</object> to the left of<phrase> a blue square</phrase><object><patch_index_0090><patch_index_0700>"
           "</object>.")
NEEDS_BROWSER = os.environ.get("KOSMOS2_REQUIRE_BROWSER") == "1"  # .ci/run: a browser test must not skip


def memorized_checkpoint(directory, spm_path, steps: int = 150) -> str:
    """A `tiny` model trained until it continues `<grounding>An image of` with CAPTION on any image."""
    import jax
    import jax.numpy as jnp
    import optax

    from kosmos2_jax import weights
    from kosmos2_jax.models import Kosmos2, tiny
    from kosmos2_jax.format.processor import Kosmos2Processor
    from kosmos2_jax.format.tokenizer import Kosmos2Tokenizer

    tok = Kosmos2Tokenizer.from_file(spm_path)
    model = Kosmos2(tiny(vocab_size=tok.vocab_size))
    processor = Kosmos2Processor(tok, image_size=model.config.vision.image_size,
                                 num_image_tokens=model.config.latent_query_num)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)) for _ in range(4)]
    inputs = {k: jnp.asarray(v) for k, v in processor([CAPTION] * 4, images=images, add_eos_token=True).items()}
    params = model.init(jax.random.PRNGKey(0), inputs["pixel_values"][:1], inputs["input_ids"][:1],
                        inputs["attention_mask"][:1], inputs["image_embeds_position_mask"][:1])["params"]
    ids = inputs["input_ids"]
    targets = inputs["attention_mask"][:, 1:] * (1 - inputs["image_embeds_position_mask"][:, 1:])

    def loss(p):
        logits = model.apply({"params": p}, inputs["pixel_values"], ids, inputs["attention_mask"],
                             inputs["image_embeds_position_mask"])
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
        return jnp.sum(nll * targets) / jnp.sum(targets)

    opt = optax.adam(3e-3)

    @jax.jit
    def step(p, state):
        value, grads = jax.value_and_grad(loss)(p)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state, value

    state = opt.init(params)
    for _ in range(steps):
        params, state, value = step(params, state)
    assert float(value) < 0.05, f"the tiny model did not memorize its caption (loss {float(value):.3f})"
    weights.save_checkpoint(directory, model.config, params)
    return str(directory)


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    """Shapes captions and the page's prompts: every default prompt encodes."""
    from kosmos2_jax.format import tokenizer

    d = tmp_path_factory.mktemp("serve_spm")
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    shapes = ["circle", "square", "triangle", "star"]
    lines = [f"a {c} {s} to the left of two {c2} {s2}s" for c in colours for s in shapes for c2 in colours
             for s2 in shapes]
    lines += ["An image of a dog.", "Describe this image in detail: It is a dog.",
              "Question: What is in the image? Answer: a dog."] * 20
    (d / "text.txt").write_text("\n".join(lines) + "\n")
    return tokenizer.train_sentencepiece(str(d / "text.txt"), 300, str(d / "serve"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, spm):
    return memorized_checkpoint(tmp_path_factory.mktemp("serve") / "memorized", spm)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_images")
    rng = np.random.default_rng(1)
    paths = []
    for i in range(8):
        path = d / f"image_{i}.png"
        Image.fromarray(rng.integers(0, 255, (60 + 4 * i, 90, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def server(checkpoint, spm, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("serve_log") / "serve.log"
    with open(log_path, "w") as log:
        proc, url = start_server(["--checkpoint", checkpoint, "--tokenizer", spm, "--batch_sizes", "1,8",
                                  "--examples", ""], log=log)
        try:
            yield proc, url, log_path
        finally:
            proc.terminate()
            proc.wait(30)


@pytest.fixture(scope="module")
def client(server):
    return gr_client.Client(server[1], verbose=False)


def call(client, endpoint, image, text, decoding=DECODING):
    """The endpoint's outputs; the annotated image and the highlighted text come as updates that
    carry their colours: their values are returned."""
    upload = gr_client.handle_file(image) if image else None
    answer = client.predict(upload, text, *decoding, api_name=f"/{endpoint}")
    return tuple(a["value"] if isinstance(a, dict) and a.get("__type__") == "update" else a for a in answer)


def test_start_up_compiles_the_page_s_programs(server):
    log = server[2].read_text()
    assert "compiled describe (batch 1" in log and "compiled describe (batch 8" in log
    assert "not compiled" not in log, log  # every default prompt encodes with this tokenizer
    assert re.search(r"compiled \d+ programs", log)
    assert not list((REPO / "kosmos2_jax").glob("*.pyi"))  # Gradio writes stubs next to component subclasses


def test_each_tab_answers_well_formed_output(client, images):
    boxes, text, record, status = call(client, "describe", images[0], "<grounding>An image of")
    assert "s for a batch of" in status and record["task"] == "describe"
    assert [e["phrase"] for e in record["entities"]] == ["a red circle", "a blue square"]
    assert {a["label"] for a in boxes["annotations"]} == {"a red circle", "a blue square"}
    assert os.path.isfile(boxes["image"])
    assert "".join(piece["token"] for piece in text) == record["clean_text"]
    assert [p["token"] for p in text if p["class_or_confidence"]] == ["a red circle", "a blue square"]

    boxes, record, status = call(client, "ground", images[0], "a red circle\na blue square")
    assert "s for a batch of 2" in status  # the two phrases ran as one batch
    assert [p["phrase"] for p in record["phrases"]] == ["a red circle", "a blue square"]
    assert all(len(b) == 4 for p in record["phrases"] for b in p["boxes"])

    boxes, text, record, status = call(client, "refer", images[0], "9, 6, 45, 30")
    w, h = Image.open(images[0]).size
    ul, lr = grounding.box_to_patch_pair((9 / w, 6 / h, 45 / w, 30 / h))
    assert record["text"].startswith(f"<grounding><phrase> It</phrase><object><patch_index_{ul:04d}>"
                                     f"<patch_index_{lr:04d}></object> is")
    assert record["entities"][0]["phrase"] == "It" and "It" in {a["label"] for a in boxes["annotations"]}

    boxes, text, record, status = call(client, "ask", images[0], "What is in the image?")
    assert record["prompt"] == "<grounding> Question: What is in the image? Answer:"
    assert "s for a batch of" in status and isinstance(text, list)


def test_describe_equals_predict(client, checkpoint, spm, images, tmp_path):
    out = tmp_path / "predict.json"
    assert predict.main(["--checkpoint", checkpoint, "--tokenizer", spm, "--image", images[3],
                         "--json", str(out)]) == 0
    import json

    [expected] = json.loads(out.read_text())
    _, _, record, _ = call(client, "describe", images[3], "<grounding>An image of")
    for key in ("prompt", "text", "clean_text", "entities"):
        assert record[key] == expected[key], key
    assert record["entities"]  # the memorized caption's two entities, in pixels of this image


def test_concurrent_requests_are_batched(server, images):
    result = measure(server[1], images, "<grounding>An image of")
    print(f"\none request {result['one_request_s']:.3f} s; 8 at once {result['all_concurrent_s']} s "
          f"({result['ratio']:.2f}x); server batches {result['batches']}")
    assert result["same_answers"]
    assert max(result["batches"]) > 1, result["batches"]
    assert result["concurrent_s"] < 8 * result["one_request_s"], result


@pytest.mark.parametrize("endpoint, image, text, message", [
    ("describe", "not_an_image", "<grounding>An image of", "is not an image"),
    ("describe", "huge", "<grounding>An image of", "megapixels"),
    ("describe", "image", "   ", "empty prompt"),
    ("describe", "image", "<grounding>An image of \u2603", "cannot encode"),
    ("ground", "image", "", "empty phrase"),
    ("refer", "image", "10, 10, 500, 40", "outside the 90x60 image"),
    ("refer", "image", "10, 10, 10, 40", "zero-area"),
    ("refer", "image", "10, 10, 40", "4 pixel coordinates"),
    ("refer", None, "10, 10, 40, 40", "no image"),
    ("ask", "image", "what " * 600, "positions"),
])
def test_bad_input_gets_a_message_and_the_server_goes_on(server, client, images, tmp_path, endpoint, image, text,
                                                         message):
    if image == "not_an_image":
        image = tmp_path / "notes.png"
        image.write_text("not a PNG")
    elif image == "huge":
        image = tmp_path / "huge.png"
        Image.new("RGB", (7000, 6000), (200, 30, 30)).save(image)  # 42 megapixels, a small file
    elif image == "image":
        image = images[0]
    answer = call(client, endpoint, str(image) if image else None, text)
    status = answer[-1]
    assert status.startswith("**Error:**") and message in status, status
    assert answer[-2] == {"error": status.removeprefix("**Error:** ")}
    _, _, record, status = call(client, "describe", images[1], "<grounding>An image of")
    assert "s for a batch of" in status and record["entities"]
    assert server[0].poll() is None


def test_out_of_range_settings_are_refused_by_the_page_s_limits(server, client, images):
    with pytest.raises(gr_client.exceptions.AppError, match="less than minimum"):
        call(client, "describe", images[0], "<grounding>An image of", ("sample", 16, 3, 1, 0.0, 0.9, 0))
    assert "s for a batch of" in call(client, "describe", images[0], "<grounding>An image of")[-1]
    # the server's console: no traceback for a refused value, no warning per request
    log = server[2].read_text()
    assert "Traceback" not in log and "Warning" not in log, log[-3000:]


def test_the_api_lists_the_four_tabs_only(client):
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert sorted(endpoints) == ["/ask", "/describe", "/ground", "/refer"]
    strategy = endpoints["/describe"]["parameters"][2]
    assert strategy["label"] == "strategy" and "'sample'" in str(strategy) and "sampling" not in str(strategy), strategy


def test_status_counts_entities_in_words():
    from kosmos2_jax.serving import webapp

    class _Service:
        name = "m"

    line = lambda n: webapp.status_line({"seconds": 0.5, "batch": 1, "entities": [{}] * n}, _Service())  # noqa: E731
    assert "· 1 entity ·" in line(1) and "· 0 entities ·" in line(0) and "· 2 entities ·" in line(2)


def test_a_tab_whose_prompt_the_tokenizer_cannot_write_says_so_up_front(tmp_path):
    """The demo's 64-piece tokenizer cannot write the Refer and Ask prompts: the page says so on
    those tabs before anyone asks, and not on Describe or Ground."""
    from kosmos2_jax.format import tokenizer
    from kosmos2_jax.serving import service as serving
    from kosmos2_jax.serving import webapp

    (tmp_path / "t.txt").write_text("\n".join(f"a {c} circle to the left of a {c} square" for c in
                                              ("red", "blue", "green", "yellow")) * 20 + "\n")
    spm = tokenizer.train_sentencepiece(str(tmp_path / "t.txt"), 40, str(tmp_path / "s"))
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", spm)
    app = webapp.build_app(serving.Service.load(ckpt, spm, (1,)), [], ["<grounding>"])
    warnings = {b.elem_id: b.value for b in app.blocks.values() if (getattr(b, "elem_id", None) or "").endswith("-warning")}
    assert sorted(warnings) == ["ask-warning", "refer-warning"], warnings
    assert "cannot write this tab's prompt" in warnings["refer-warning"] and "'I'" in warnings["refer-warning"]


def test_sampling_and_beam_search_answer(client, images):
    for decoding in (("sample", 12, 3, 1, 0.8, 0.9, 5), ("beam", 12, 3, 2, 1.0, 1.0, 0)):
        first = call(client, "describe", images[0], "<grounding>An image of", decoding)
        again = call(client, "describe", images[0], "<grounding>An image of", decoding)
        assert "s for a batch of 1" in first[-1]
        assert first[2]["text"] == again[2]["text"]  # a seed gives the same sample


# --- the page in a real browser ----------------------------------------------------------------
def _chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None or not _has_playwright():
        if NEEDS_BROWSER:
            pytest.fail("KOSMOS2_REQUIRE_BROWSER=1 but chromium or playwright is missing")
        pytest.skip("no chromium (apt-get install chromium) or playwright")
    return path


def _has_playwright() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def page(server):
    from playwright.sync_api import sync_playwright

    executable = _chromium()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.hosts = set()
        page.on("request", lambda request: page.hosts.add(request.url.split("/")[2]))
        page.goto(server[1])
        page.wait_for_selector("#describe-button")
        yield page
        browser.close()


def test_the_page_describes_an_upload(page, server, images, tmp_path):
    page.locator("#describe-image input[type=file]").set_input_files(images[2])
    page.wait_for_selector("#describe-image img")
    page.click("#describe-button")
    page.wait_for_selector("#describe-status :text('s for a batch of')", timeout=60_000)
    page.locator("#describe-boxes img").first.wait_for(state="visible", timeout=30_000)  # the annotated image
    for label in ("a red circle", "a blue square"):  # the entity labels under the image, the caption's highlights
        page.wait_for_selector(f"#describe-boxes :text('{label}')", timeout=30_000)
        page.wait_for_selector(f"#describe-text :text('{label}')", timeout=30_000)
    page.screenshot(path=str(tmp_path / "describe.png"), full_page=True)
    assert Image.open(tmp_path / "describe.png").size[0] == 1280
    port = server[1].split(":")[2].strip("/")
    assert page.hosts == {f"127.0.0.1:{port}"}, page.hosts  # nothing from the internet: fonts, analytics


def test_the_page_refers_to_a_region_drawn_with_two_clicks(page, images, tmp_path):
    page.get_by_role("tab", name="Refer").click()
    page.locator("#refer-image input[type=file]").set_input_files(images[0])
    image = page.locator("#refer-image img").first
    image.wait_for()
    time.sleep(0.5)
    box = image.bounding_box()
    w, h = Image.open(images[0]).size
    image.click(position={"x": box["width"] * 0.2, "y": box["height"] * 0.25})
    page.wait_for_function("document.querySelector('#refer-box textarea').value.includes('?')")
    image.click(position={"x": box["width"] * 0.7, "y": box["height"] * 0.75})
    page.wait_for_function("!document.querySelector('#refer-box textarea').value.includes('?')")
    x1, y1, x2, y2 = (int(v) for v in page.input_value("#refer-box textarea").split(","))
    assert abs(x1 - 0.2 * w) <= 2 and abs(y1 - 0.25 * h) <= 2 and abs(x2 - 0.7 * w) <= 2 and abs(y2 - 0.75 * h) <= 2
    page.click("#refer-button")
    page.wait_for_selector("#refer-status :text('s for a batch of')", timeout=60_000)
    page.wait_for_selector("#refer-text :text('It')", timeout=30_000)  # the region's phrase, highlighted
    page.locator("#refer-boxes img").first.wait_for(state="visible", timeout=30_000)
    page.screenshot(path=str(tmp_path / "refer.png"), full_page=True)


def test_service_answers_a_mixed_batch_row_by_row(checkpoint, spm, images):
    """The library under the page: a bad request in a batch gets its error, the others their answers,
    each equal to its answer alone (rows padded to the batch size 4)."""
    from kosmos2_jax.serving import service as serving

    service = serving.Service.load(checkpoint, spm, batch_sizes=(1, 4))
    opened = [Image.open(p).convert("RGB") for p in images[:3]]
    requests = [serving.describe(opened[0]), serving.refer(opened[1], "0, 0, 0, 5"), serving.describe(opened[1]),
                serving.describe(opened[2])]
    together = service.run(requests)
    assert isinstance(together[1], serving.RequestError) and "zero-area" in str(together[1])
    assert [r["batch"] for r in (together[0], together[2], together[3])] == [3, 3, 3]
    for request, record in zip(requests, together):
        if not isinstance(record, serving.RequestError):
            [alone] = service.run([request])
            assert alone["batch"] == 1 and alone["text"] == record["text"] and alone["entities"] == record["entities"]


def test_example_images_are_the_folder_s_images_sorted(tmp_path):
    from kosmos2_jax.serving import webapp

    for name in ("b.jpg", "a.PNG", "notes.txt", "c.webp"):
        (tmp_path / name).write_bytes(b"")
    assert webapp.example_images(str(tmp_path)) == [str(tmp_path / n) for n in ("a.PNG", "b.jpg", "c.webp")]
    assert webapp.example_images(str(tmp_path / "absent")) == [] and webapp.example_images("") == []


def test_serve_without_a_checkpoint_is_one_line(tmp_path, capsys):
    from kosmos2_jax import serve

    with pytest.raises(SystemExit) as e:
        serve.main(["--checkpoint", str(tmp_path / "missing"), "--tokenizer", str(tmp_path / "x.model")])
    assert e.value.code == 2 and "missing" in capsys.readouterr().err


def test_concurrent_requests_of_different_tabs(client, images):
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda args: call(client, *args), [
            ("describe", images[4], "<grounding>An image of"), ("ground", images[4], "a red circle"),
            ("refer", images[4], "1, 1, 30, 30")]))
    assert all("s for a batch of" in a[-1] for a in answers)


def test_serve_on_a_busy_port_is_one_line_before_loading(server, checkpoint, spm, capsys):
    from kosmos2_jax import serve

    port = int(server[1].rstrip("/").rsplit(":", 1)[1])
    capsys.readouterr()
    assert serve.main(["--checkpoint", checkpoint, "--tokenizer", spm, "--port", str(port), "--examples", ""]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and f"--port {port}: cannot listen on 127.0.0.1:{port}" in err, err
    assert "loaded" not in captured.out  # refused before the model was read


def test_the_examples_show_and_fill_every_tab(checkpoint, spm, images, tmp_path):
    """Example images (`--examples`): visible thumbnails whichever tab is open (Gradio 6's
    per-tab examples drew as empty 2 px items outside the first tab); a click puts the image in
    every tab."""
    from playwright.sync_api import sync_playwright

    executable = _chromium()
    folder = tmp_path / "examples"
    folder.mkdir()
    for path in images[:3]:
        shutil.copy(path, folder)
    with open(tmp_path / "serve.log", "w") as log:  # open while the server's output is copied into it
        proc, url = start_server(["--checkpoint", checkpoint, "--tokenizer", spm, "--batch_sizes", "1",
                                  "--examples", str(folder), "--no_warm_up"], log=log)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                page.goto(url)
                page.wait_for_selector("#describe-button")
                for tab in ("Ground", "Refer", "Ask", "Describe"):
                    page.get_by_role("tab", name=tab).click()
                    page.locator("#examples img").first.wait_for(state="visible", timeout=10_000)
                    sizes = page.evaluate("() => Array.from(document.querySelectorAll('#examples img')).map(i => "
                                          "[i.getBoundingClientRect().width, i.getBoundingClientRect().height])")
                    assert len(sizes) == 3 and all(w > 40 and h > 40 for w, h in sizes), (tab, sizes)
                page.get_by_role("tab", name="Ground").click()
                page.locator("#examples img").first.click()
                for tab in ("ground", "ask", "refer", "describe"):
                    page.get_by_role("tab", name=tab.capitalize()).click()
                    page.locator(f"#{tab}-image img").first.wait_for(state="visible", timeout=10_000)
                browser.close()
        finally:
            proc.terminate()
            proc.wait(30)
