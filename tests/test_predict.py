import importlib.util
import json
import os
import subprocess
import sys
import re

import numpy as np
import pytest
from PIL import Image

from conftest import IMAGES_DIR, REPO, official_spm_path, save_tiny_checkpoint, xla_flags
from kosmos2_jax import predict
from kosmos2_jax.inference.generate import PROGRAMS
from kosmos2_jax.format.visualize import draw_entities, entity_colours


def _checkpoint(tmp_path, spm):
    return save_tiny_checkpoint(tmp_path / "ckpt", spm)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, small_spm):
    return _checkpoint(tmp_path_factory.mktemp("predict"), small_spm), small_spm


@pytest.fixture
def image_path(tmp_path):
    path = tmp_path / "shapes.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_predict_end_to_end(tiny_ckpt, image_path, tmp_path, capsys):
    ckpt, spm = tiny_ckpt
    rc = predict.main(["--checkpoint", ckpt, "--tokenizer", spm, "--image", image_path, "--image", image_path,
                       "--prompt", "<grounding>a red circle to the left of", "--box", "a red circle=0.1,0.1,0.4,0.5",
                       "--max_new_tokens", "12", "--out", str(tmp_path / "out.png"), "--json", str(tmp_path / "o.json")])
    assert rc == 0
    for i in (0, 1):
        assert Image.open(tmp_path / f"out_{i}.png").size == (90, 60)
    results = json.loads((tmp_path / "o.json").read_text())
    assert len(results) == 2 and results[0]["prompt"].startswith("<grounding><phrase>a red circle</phrase>")
    assert results[0]["text"] == results[1]["text"]  # same image, same prompt
    assert "<object><patch_index_" in results[0]["text"]  # the --box went into the prompt
    assert all(set(e) == {"phrase", "span", "boxes", "boxes_normalized"} for r in results for e in r["entities"])
    assert "generated 2 x" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--image", "missing.png"], "missing.png"),
    (["--box", "a red circle=0.5,0.1,0.4,0.5"], "x1 < x2"),
    (["--box", "a red circle=0.1,0.1,0.4"], "4 coordinates"),
    (["--box", "a blue star=0.1,0.1,0.4,0.5"], "does not occur as whole words in the text of the prompt"),
    (["--box", "a red circle=10,10,9000,50", "--box_units", "px"], "outside"),
    (["--box", "a red circle=10,10,90,50"], "--box_units px"),
])
def test_predict_bad_input(tiny_ckpt, image_path, capsys, args, message):
    ckpt, spm = tiny_ckpt
    base = ["--checkpoint", ckpt, "--tokenizer", spm, "--prompt", "<grounding>a red circle", "--max_new_tokens", "4"]
    if "--image" not in args:
        base += ["--image", image_path]
    try:
        rc = predict.main(base + args)
    except SystemExit as e:  # argument errors (a missing file) exit from argparse
        rc = e.code
    assert rc == 2
    assert message in capsys.readouterr().err


def test_predict_names_a_param_that_does_not_fit_the_config(tiny_ckpt, image_path, tmp_path, capsys):
    """predict takes the shapes from the checkpoint's metadata (no tracing); weights that do not
    fit model_config.json still fail with one line naming the parameter."""
    import shutil

    ckpt, spm = tiny_ckpt
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    config = json.loads((broken / "model_config.json").read_text())
    config["text"]["ffn_dim"] += 8
    (broken / "model_config.json").write_text(json.dumps(config))
    rc = predict.main(["--checkpoint", str(broken), "--tokenizer", spm, "--image", image_path,
                       "--prompt", "<grounding>a red circle", "--max_new_tokens", "2"])
    assert rc == 2
    assert "fc1/bias has shape (128,), model_config.json says (136,)" in capsys.readouterr().err


def test_pixel_boxes_are_normalized():
    assert predict.parse_box("a dog=10,20,50,60", (100, 200), "px") == ("a dog", (0.1, 0.1, 0.5, 0.3))


@pytest.mark.skipif(not IMAGES_DIR.is_dir() or official_spm_path() is None, reason="shared demo images/spm absent")
def test_predict_on_demo_images(tmp_path):
    ckpt = _checkpoint(tmp_path, official_spm_path())
    images = sorted(str(p) for p in IMAGES_DIR.iterdir())
    args = ["--checkpoint", ckpt, "--tokenizer", official_spm_path(), "--max_new_tokens", "8",
            "--out", str(tmp_path / "demo.png"), "--json", str(tmp_path / "demo.json")]
    for path in images:
        args += ["--image", path]
    assert predict.main(args) == 0
    assert len(json.loads((tmp_path / "demo.json").read_text())) == len(images)
    assert all((tmp_path / f"demo_{i}.png").is_file() for i in range(len(images)))


def test_draw_entities_colours_each_entity():
    image = Image.new("RGB", (320, 320), (255, 255, 255))
    entities = [("a dog", (0, 5), [(0.1, 0.5, 0.4, 0.9)]), ("a cat", (6, 11), [(0.5, 0.5, 0.9, 0.9), (0.6, 0.1, 0.8, 0.3)])]
    out = np.asarray(draw_entities(image, entities))
    colours = entity_colours(2)
    assert tuple(out[int(0.7 * 320), int(0.1 * 320)]) == colours[0]  # left edge of the dog box
    assert tuple(out[int(0.2 * 320), int(0.8 * 320)]) == colours[1]  # right edge of the cat's second box
    assert colours[0] != colours[1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_label_tags_never_cover_each_other(seed):
    """evaluate --draw's case (the truth and the model's box nearly equal) and random boxes: every
    tag inside the picture, none over another."""
    from kosmos2_jax.format.visualize import place_tags

    rng = np.random.default_rng(seed)
    corners = rng.uniform(0, 256, (6, 2, 2))
    boxes = [(40, 60, 120, 140), (42, 61, 121, 139)] + [tuple(np.sort(c, axis=0).T.reshape(-1)[[0, 2, 1, 3]]) for c in corners]
    sizes = [(int(rng.integers(60, 150)), 20) for _ in boxes]
    tags = place_tags(boxes, sizes, 256, 256)
    for i, (a, (tw, th)) in enumerate(zip(tags, sizes)):
        assert 0 <= a[0] and a[2] <= 256 and 0 <= a[1] and a[3] <= 256 and (a[2] - a[0], a[3] - a[1]) == (tw, th)
        for b in tags[:i]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)


def test_a_box_stays_visible_on_a_shape_of_its_own_colour():
    colour = entity_colours(1)[0]
    image = Image.new("RGB", (256, 256), (255, 255, 255))
    image.paste(colour, (64, 64, 192, 192))  # a shape of the box's own colour, the box on its edges
    out = np.asarray(draw_entities(image, [("truth", (0, 0), [(0.25, 0.25, 0.75, 0.75)])]))
    row = out[128, 55:75]  # across the box's left edge: dark on both sides of the coloured line
    is_colour = np.all(row == colour, axis=1)
    is_dark = np.all(row < 60, axis=1)
    first = int(np.argmax(is_colour))
    last = first + int(np.argmin(is_colour[first:]))
    assert is_dark[first - 1] and is_dark[last], row


def test_second_predict_takes_its_programs_from_the_compilation_cache(tiny_ckpt, image_path, tmp_path):
    """A fresh process running the same predict again compiles nothing: every generation program
    comes from --compilation_cache (JAX's persistent cache, the one program store).
    --no_compilation_cache compiles afresh."""
    import os
    import subprocess
    import sys

    ckpt, spm = tiny_ckpt
    cmd = [sys.executable, "-m", "kosmos2_jax.predict", "--checkpoint", ckpt, "--tokenizer", spm, "--image", image_path,
           "--prompt", "<grounding>a red circle", "--max_new_tokens", "4", "--compilation_cache", str(tmp_path / "xla")]
    env = dict(os.environ, JAX_LOG_COMPILES="1", JAX_PLATFORMS="cpu")  # compilations are logged as warnings
    runs = [subprocess.run(c, capture_output=True, text=True, env=env)
            for c in (cmd, cmd, cmd + ["--no_compilation_cache"])]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    for name in PROGRAMS:  # generation's programs
        hit = re.compile(rf"Persistent compilation cache hit for '?jit_{name}'?")
        assert not hit.search(runs[0].stderr) and hit.search(runs[1].stderr), name
        assert not hit.search(runs[2].stderr)
    assert runs[0].stdout.splitlines()[0] == runs[1].stdout.splitlines()[0]  # the same caption
    assert runs[0].stdout.splitlines()[0] == runs[2].stdout.splitlines()[0]


@pytest.mark.parametrize("prompt,box,tagged", [
    # the paper's format (a space inside the tags): kept as it is, the box after it
    ("<grounding><phrase> it</phrase> is", "it", "<grounding><phrase> it</phrase> is"),
    # a whole word of the text, never a piece of markup or of another word
    ("<grounding>a circle in a square", "in", "<grounding>a circle<phrase> in</phrase> a square"),
    ("<grounding>a circle in a square", "a square", "<grounding>a circle in<phrase> a square</phrase>"),
    ("<grounding>a red circle", "a red circle", "<grounding><phrase>a red circle</phrase>"),
    # a phrase inside an already-tagged one is not tagged again
    ("<grounding><phrase> a big dog</phrase> and a dog", "dog", "<grounding><phrase> a big dog</phrase> and a<phrase> dog</phrase>"),
])
def test_box_phrases_tag_whole_words_of_the_text(prompt, box, tagged):
    from kosmos2_jax.predict import prompt_with_boxes

    text, bboxes = prompt_with_boxes(prompt, [(box, (0.1, 0.1, 0.5, 0.5))])
    assert text == tagged
    phrases = re.findall(r"<phrase>(.+?)</phrase>", text)
    assert [b for b, p in zip(bboxes, phrases) if p.strip() == box] == [[(0.1, 0.1, 0.5, 0.5)]]


def test_box_phrase_only_in_markup_is_refused():
    from kosmos2_jax.predict import prompt_with_boxes
    from kosmos2_jax.utils.errors import UsageError

    with pytest.raises(UsageError, match="'ground' does not occur as whole words"):
        prompt_with_boxes("<grounding>a circle", [("ground", (0.1, 0.1, 0.5, 0.5))])


def test_predict_box_in_the_papers_format_through_the_cli(tiny_ckpt, image_path, tmp_path, capsys):
    ckpt, spm = tiny_ckpt
    out = tmp_path / "r.json"
    rc = predict.main(["--checkpoint", ckpt, "--tokenizer", spm, "--image", image_path, "--prompt",
               "<grounding><phrase> a</phrase> is", "--box", "a=0.1,0.1,0.5,0.5", "--max_new_tokens", "4",
               "--json", str(out)])
    assert rc == 0
    record = json.loads(out.read_text())[0]
    # the prompt that was fed, its box included
    assert re.fullmatch(r"<grounding><phrase> a</phrase><object><patch_index_\d{4}><patch_index_\d{4}></object> is",
                        record["prompt"]), record["prompt"]


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the test extras) is not installed")
def test_no_tpu_probe_messages_without_jax_platforms(tiny_ckpt, image_path, tmp_path):
    """With libtpu installed and no TPU here, a command run without JAX_PLATFORMS=cpu prints none of
    libtpu's probe errors."""
    ckpt, spm = tiny_ckpt
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    out = subprocess.run([sys.executable, "-m", "kosmos2_jax.predict", "--checkpoint", ckpt, "--tokenizer", spm,
                          "--image", image_path, "--prompt", "<grounding>a red circle", "--max_new_tokens", "2"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TPU" not in out.stderr and "libtpu" not in out.stderr, out.stderr[-3000:]


def _readme_generation_code():
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Generation and grounded text"):]
    return section[section.index("```python\n") + 10:section.index("```\n", section.index("```python\n") + 10)]


def test_the_readme_generation_example_on_a_model_of_another_size(small_spm, image_path, tmp_path):
    """The README's Python example, run as written on a model with 28 px images and a 16 x 16 grid
    (not the released 224 px, 32 x 32): the same caption and entities as `predict`; a processor
    built for another model is refused by generate, not decoded into wrong boxes."""
    from kosmos2_jax.format.grounding import post_process_ids
    from kosmos2_jax.format.processor import Kosmos2Processor
    from kosmos2_jax.inference.generate import generate
    from kosmos2_jax.format.tokenizer import Kosmos2Tokenizer
    from kosmos2_jax.utils.errors import UsageError

    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", small_spm, num_location_tokens=256)
    prompt = "<grounding>a red circle"
    code = (_readme_generation_code().replace('"ckpt/kosmos2"', repr(ckpt))
            .replace('"kosmos-2-patch14-224/sentencepiece.bpe.model"', repr(small_spm))
            .replace('"snowman.png"', repr(image_path)).replace('"<grounding>An image of"', repr(prompt))
            .replace("post_process_ids(out.sequences[0], proc.tokenizer)", "result = post_process_ids(out.sequences[0], proc.tokenizer)"))
    scope = {}
    exec(code, scope)
    assert scope["proc"].num_bins == 16 and scope["proc"].image_size == scope["model"].config.vision.image_size
    out = tmp_path / "p.json"
    assert predict.main(["--checkpoint", ckpt, "--tokenizer", small_spm, "--image", image_path, "--prompt", prompt,
                         "--json", str(out)]) == 0
    record = json.loads(out.read_text())[0]
    text, entities = scope["result"]
    assert text == record["clean_text"] and [e[0] for e in entities] == [e["phrase"] for e in record["entities"]]
    # a box written with the model's grid reads back as that box
    proc = scope["proc"]
    ids = proc([prompt.replace("a red circle", "<phrase>a red circle</phrase>")], images=[image_path],
               bboxes=[[(0.34, 0.22, 0.53, 0.41)]])["input_ids"][0]
    [(_, _, [box])] = post_process_ids(ids, proc.tokenizer)[1]
    assert np.allclose(box, (0.34, 0.22, 0.53, 0.41), atol=1 / 16)
    # the released model's processor settings with this model: an error naming the fix
    model, params = scope["model"], scope["params"]
    wrong = Kosmos2Processor(Kosmos2Tokenizer.from_file(small_spm))
    with pytest.raises(UsageError, match="28 px.*processor_for"):
        generate(model, params, wrong([prompt], images=[image_path]), max_new_tokens=2)
    wrong = Kosmos2Processor(Kosmos2Tokenizer.from_file(small_spm), image_size=28, num_image_tokens=64)
    with pytest.raises(UsageError, match="image tokens.*processor_for"):
        generate(model, params, wrong([prompt], images=[image_path]), max_new_tokens=2)


def test_predict_out_format_follows_its_name_and_a_non_image_is_named(tiny_ckpt, image_path, tmp_path, capsys):
    ckpt, spm = tiny_ckpt
    base = ["--checkpoint", ckpt, "--tokenizer", spm, "--prompt", "<grounding>a red circle", "--max_new_tokens", "2"]
    out = tmp_path / "x.jpg"
    assert predict.main([*base, "--image", image_path, "--out", str(out)]) == 0
    assert Image.open(out).format == "JPEG"
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    capsys.readouterr()
    assert predict.main([*base, "--image", str(text)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(text) in err and "BytesIO" not in err and "not an image format" in err, err


def test_predict_in_both_decode_modes_gives_the_same_answer(tiny_ckpt, image_path, tmp_path):
    from kosmos2_jax.inference.generate import DECODE_MODES
    from kosmos2_jax.utils import cli

    assert cli.DECODE_MODES == DECODE_MODES
    ckpt, spm = tiny_ckpt
    answers = []
    for mode in ("layerwise", "fused"):
        out = tmp_path / f"{mode}.json"
        assert predict.main(["--checkpoint", ckpt, "--tokenizer", spm, "--image", image_path, "--prompt",
                             "<grounding>a red circle", "--max_new_tokens", "6", "--decode_mode", mode,
                             "--tokens_per_call", "4", "--json", str(out)]) == 0
        answers.append(json.loads(out.read_text())[0]["text"])
    assert answers[0] == answers[1]


def test_predict_on_a_mesh_of_two_devices_gives_the_same_answer(tiny_ckpt, image_path, tmp_path, capsys):
    """`predict --mesh tensor=2` in a process with 2 devices: the params sharded, the same answer as
    on one device (fused mode both); a bad --mesh is one line naming it."""
    ckpt, spm = tiny_ckpt
    base = ["--checkpoint", ckpt, "--tokenizer", spm, "--image", image_path, "--prompt", "<grounding>a red circle",
            "--max_new_tokens", "6", "--decode_mode", "fused", "--tokens_per_call", "4"]
    assert predict.main([*base, "--json", str(tmp_path / "one.json")]) == 0
    env = dict(os.environ, XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "kosmos2_jax.predict", *base, "--mesh", "tensor=2", "--json",
                          str(tmp_path / "two.json")], env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    one, two = (json.loads((tmp_path / f"{n}.json").read_text())[0]["text"] for n in ("one", "two"))
    assert one == two
    capsys.readouterr()
    assert predict.main([*base, "--mesh", "tensor=3", "--json", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "needs 3 devices" in err, err
    assert predict.main([*base, "--mesh", "model=2", "--json", str(tmp_path / "bad.json")]) == 2
    assert "'model=2'" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the test extras) is not installed")
def test_sizing_a_serving_slice_compiles_for_one_chip(tiny_ckpt, capsys):
    """`predict --compile_only --topology`: the accelerator mode compiled for a v5e chip (no TPU
    here), its memory against HBM and the largest batch; a batch that cannot fit is said so."""
    ckpt, _ = tiny_ckpt
    base = ["--compile_only", "--topology", "v5e-4", "--checkpoint", ckpt, "--max_new_tokens", "8"]
    assert predict.main([*base, "--batch_size", "4"]) == 0
    out = capsys.readouterr().out
    assert "v5e-4: 4 devices" in out and "one model replica per device" in out, out
    assert re.search(r"per device: params [\d.]+ GiB, KV cache [\d.]+ GiB, .* of 16.0 GiB: fits", out), out
    largest = int(re.search(r"largest batch that fits: about (\d+) per device", out).group(1))
    assert largest > 4
    assert predict.main([*base, "--batch_size", str(4 * largest)]) == 0
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "largest batch that fits: about" in out, out
    # one replica over 2 chips (heads, MLP, vocabulary split): the params and KV cache per chip shrink
    assert predict.main([*base, "--batch_size", "4", "--mesh", "tensor=2"]) == 0
    sharded = capsys.readouterr().out
    assert "one model replica per 2 devices (mesh data=1 fsdp=1 tensor=2)" in sharded, sharded
    assert "per replica (2 x " in sharded and ": fits" in sharded, sharded
    from kosmos2_jax import weights
    from kosmos2_jax.inference import serving_check
    from kosmos2_jax.models import Kosmos2

    model = Kosmos2(weights.model_config_of(ckpt, **weights.DECODING))
    shapes = weights.abstract_params_of(ckpt, model)
    quiet = dict(say=lambda _: None, max_new_tokens=8, batch_size=4)
    one, two = (serving_check.check(model, shapes, "v5e-4", mesh_text=m, **quiet) for m in ("", "tensor=2"))
    assert two["params_gib"] < 0.75 * one["params_gib"] and two["kv_cache_gib"] < 0.55 * one["kv_cache_gib"], (one, two)
