"""experiments/: every config runs with `:runlocal` through the CLI, the pretraining config holds
the paper's Table 7 settings, and `config.evals` runs any evaluation task inside training."""

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
INTERLEAVED = REPO / "data" / "interleaved" / "dummy_data"  # MMC4 and OBELICS layouts, with their images
CONFIGS = sorted(p.stem for p in (REPO / "experiments").glob("*.py"))


def _config(name, arg=None):
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory, shapes_tfds, small_spm):
    """What `make demo-data` writes (tfds/shapes/... and spm/shapes.model), from the test fixtures."""
    root = tmp_path_factory.mktemp("demo_data")
    (root / "tfds").symlink_to(shapes_tfds)
    (root / "spm").mkdir()
    shutil.copy(small_spm, root / "spm" / "shapes.model")
    return root


def _coco_files(tmp_path) -> dict:
    """A COCO detection file of 12 shapes images (categories: the shapes), pixel [x, y, w, h] boxes."""
    import json

    from kosmos2_jax.data.synthetic import SHAPES, make_example

    images = tmp_path / "coco_images"
    images.mkdir()
    coco = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": s} for i, s in enumerate(SHAPES)]}
    for i in range(12):
        record = make_example(0, "train", i)
        (images / f"{i}.png").write_bytes(record["image"])
        coco["images"].append({"id": i, "file_name": f"{i}.png", "width": 128, "height": 128})
        for start, end, x0, y0, x1, y1, _ in record["noun_chunks"]:
            shape = next(s for s in SHAPES if s in record["caption"][int(start):int(end)])
            coco["annotations"].append({"id": len(coco["annotations"]), "image_id": i, "iscrowd": 0,
                                        "category_id": SHAPES.index(shape) + 1,
                                        "bbox": [float(v) * 128 for v in (x0, y0, x1 - x0, y1 - y0)]})
    (tmp_path / "instances_train.json").write_text(json.dumps(coco))
    return dict(path=str(tmp_path / "instances_train.json"), data_dir=str(images))


def test_every_config_builds_on_the_presets():
    assert "shapes_tiny" in CONFIGS  # the glob finds the configs (a researcher's new ones too)
    keys = None
    for name in CONFIGS:
        text = (REPO / "experiments" / f"{name}.py").read_text()
        assert "sys.path" not in text and "presets.base()" in text, name
        assert "python -m kosmos2_jax.train --config experiments/" in text and ":runlocal" in text, name
        flat = sorted(_config(name).to_dict())
        keys = keys or flat
        assert flat == keys, name  # --print_config lists the same keys for every config


def test_pretrain_config_is_table_7():
    """The paper's pretraining settings (Table 7 and the released train.sh), written out here."""
    from kosmos2_jax import weights
    from kosmos2_jax.models import kosmos2_1p6b
    from kosmos2_jax.train.trainer import model_config

    c = _config("kosmos2_pretrain")
    assert (c.optim.lr, c.optim.warmup_steps, c.train.steps, c.optim.total_steps) == (2e-4, 375, 60000, 60000)
    assert (c.optim.b1, c.optim.b2, c.optim.eps, c.optim.weight_decay, c.optim.clip_norm) == (0.9, 0.98, 1e-6, 0.01, 2.0)
    assert c.model.text.dropout == 0.1 and c.data.seq_len == 2048
    assert (c.data.span_mode, c.data.score_threshold, c.data.grounded_prob) == ("expression", 0.65, 0.5)
    assert c.num_location_tokens == 1024 and c.model.latent_query_num == 64
    assert (c.train.location_loss_weight, c.train.location_sigma) == (1.0, 0.0)  # the plain LM loss
    sources = c.data.sources  # sequences per step: grounded pairs 1,117, text 93
    assert (sources.train.kind, sources.train.weight, sources.text.kind, sources.text.weight) == ("grit", 1117, "text", 93)
    assert (sources.caption.kind, sources.caption.weight) == ("caption", 1117)  # image-caption pairs
    assert abs(c.train.batch_size * c.data.seq_len / 419_000 - 1) < 0.02  # ~419K tokens per step
    assert weights.architecture_differences(model_config(c, 65037), kosmos2_1p6b()) == []


def test_runlocal_arguments_are_checked():
    with pytest.raises(ValueError, match="unknown key 'runlokal'; known: data, runlocal, tpu"):
        _config("kosmos2_pretrain", "runlokal")
    small = _config("kosmos2_pretrain", "runlocal,data=/d")
    assert small.train.steps <= 4 and small.model.text.layers == 2 and small.data.sources.train.data_dir.startswith("/d/")


def test_pretrain_tpu_variant_is_the_estimate_table_s_best_row():
    """`:tpu` changes the attention, its dropout, remat and batch only (docs/benchmarks.md)."""
    paper, tpu = _config("kosmos2_pretrain").to_dict(), _config("kosmos2_pretrain", "tpu").to_dict()
    assert (tpu["model"]["attention_impl"], tpu["model"]["text"]["attention_dropout"]) == ("splash", 0.0)
    assert (tpu["model"]["remat_policy"], tpu["train"]["batch_size"]) == ("dots_with_no_batch_dims", 256)
    for section in ("model", "train"):
        for key in ("attention_impl", "remat_policy", "batch_size"):
            paper[section].pop(key, None), tpu[section].pop(key, None)
    paper["model"]["text"].pop("attention_dropout"), tpu["model"]["text"].pop("attention_dropout")
    assert paper == tpu


def _instruction_files(tmp_path, cfg):
    import json

    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "images" / "a.jpg")
    conversation = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    (tmp_path / "llava.json").write_text(json.dumps([{"id": str(i), "image": "a.jpg", "conversations": conversation}
                                                     for i in range(8)]))
    (tmp_path / "flan.jsonl").write_text("".join(json.dumps({"inputs": f"Count to {i}:", "targets": "1 2"}) + "\n"
                                                 for i in range(8)))
    (tmp_path / "unnatural.jsonl").write_text(json.dumps({"instruction": "Name it.", "instances": [
        {"instruction_with_input": "Name it. Input: sky", "input": "sky", "output": "blue"}] * 4}) + "\n")
    (tmp_path / "corpus.txt").write_text("a red circle\ntwo blue squares\n")
    s = cfg.data.sources
    s.llava.update(path=str(tmp_path / "llava.json"), data_dir=str(tmp_path / "images"))
    s.flan.path, s.unnatural_instructions.path = str(tmp_path / "flan.jsonl"), str(tmp_path / "unnatural.jsonl")
    s.text.path = str(tmp_path / "corpus.txt")
    s.interleaved.update(path=str(INTERLEAVED / "mmc4_docs.jsonl"), data_dir=str(INTERLEAVED / "images"))


def test_the_mixture_is_checked_before_any_work(demo_root, tmp_path):
    from kosmos2_jax.utils.errors import UsageError
    from kosmos2_jax.train import config_check

    def error(pack=True, **changes):
        cfg = _config("kosmos2_instruct", f"runlocal,data={demo_root}")
        cfg.data.pack = pack
        for key, value in changes.items():
            name, field = key.split("__")
            cfg.data.sources[name][field] = value
        with pytest.raises(UsageError) as e:
            config_check.check(cfg)
        return str(e.value)

    assert "config.data.sources.flan.path='/no/file': no such file" in error(flan__path="/no/file")
    assert "config.data.sources.train.weight=0.0: must be a number > 0" in error(train__weight=0.0)
    assert "config.data.sources.text.kind='books': must be one of" in error(text__kind="books")
    assert "no source has its data_dir or path set" in error(train__data_dir="", grounded_instruct__data_dir="")
    assert "kind flan reads a file: set config.data.sources.flan.path" in error(flan__data_dir=str(tmp_path))
    docs = str(INTERLEAVED / "mmc4_docs.jsonl")
    assert "interleaved documents need packed rows" in error(pack=False, interleaved__path=docs,
                                                             interleaved__data_dir=str(tmp_path))
    assert "with their images in config.data.sources.interleaved.data_dir: set both" in error(interleaved__path=docs)
    assert "interleaved.path='/no/docs': no such file or folder" in error(interleaved__path="/no/docs",
                                                                         interleaved__data_dir=str(tmp_path))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_runs_with_runlocal(name, demo_root, tmp_path, capsys):
    """A few steps of each config, its evaluation included: through the CLI for the pretraining
    config, in this process for the others (the same `loop.run`). The fine-tuning config's
    evaluation is pointed at RefCOCO (dummy annotations): any `evaluate` task runs inside training."""
    from eval_dummy_data import dummy_task_data

    arg = f"runlocal,data={demo_root}"
    cfg = _config(name, arg)
    steps, task = cfg.train.steps, "shapes validation, 4 items"
    if name == "kosmos2_pretrain":  # grounded pairs, image-caption pairs (the demo's records), text, documents
        (tmp_path / "corpus.txt").write_text("a red circle\ntwo blue squares\n")
        run = subprocess.run([sys.executable, "-m", "kosmos2_jax.train", "--config", f"experiments/{name}.py:{arg}",
                              "--workdir", str(tmp_path / "run"), f"--config.data.sources.text.path={tmp_path}/corpus.txt",
                              f"--config.data.sources.interleaved.path={INTERLEAVED}",
                              f"--config.data.sources.interleaved.data_dir={INTERLEAVED / 'images'}"],
                             capture_output=True, text=True, cwd=REPO, timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        console = run.stdout
    else:
        from kosmos2_jax.train.loop import run

        if name == "finetune_refcoco":
            refcoco = dummy_task_data("refcoco", tmp_path / "refcoco")
            cfg.evals.grounding.update(task="refcoco", data_dir=str(refcoco), split="val")
            task = "refcoco val, 3 items"
        if name == "kosmos2_instruct":  # every Table 8 kind we have: grounded pairs and instructions, LLaVA, language
            _instruction_files(tmp_path, cfg)
        if name == "finetune_coco":  # LoRA on a COCO detection file (runlocal alone reads the demo's records)
            cfg.data.sources.train.update(kind="coco", **_coco_files(tmp_path))
        result = run(cfg, str(tmp_path / "run"))
        console = capsys.readouterr().out
        assert result["last"]["step"] == steps and "eval_grounding_accuracy" in result["last"]
    assert f"step {steps}/{steps} loss" in console, console
    mixture = console.split("plan: ")[1].split("\n")[0]
    expected = dict(kosmos2_pretrain=["train", "caption", "text", "interleaved"], shapes_tiny=["train"],
                    finetune_refcoco=["train"], finetune_coco=["train"], kosmos2_instruct=["train", "grounded_instruct", "llava", "flan",
                                                                  "unnatural_instructions", "text", "interleaved"])
    parts = [p for p in mixture.split("; ")[1:] if not p.startswith("validation")]
    single = len(parts) == 1 and ("training records" in parts[0] or parts[0].startswith("training data "))
    names = ["train"] if single else [p.split(" ")[0] for p in parts]
    assert sorted(names) == sorted(expected[name]), mixture
    if len(expected[name]) > 1:  # each part of the mixture's own loss and examples
        line = console.split(f"step {steps}/{steps} loss")[1].split("  sources: ")[1].split("\n")[0]
        assert sorted(part.split(" ")[0] for part in line.split("; ")) == sorted(expected[name]), line
    assert f"step {steps} eval grounding: accuracy" in console and f"({task})" in console, console
    assert os.path.isfile(tmp_path / "run" / "export" / "model_config.json")
