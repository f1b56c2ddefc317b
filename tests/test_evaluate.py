import json

import pytest

from conftest import save_tiny_checkpoint
from kosmos2_jax import evaluate
from kosmos2_jax.evaluation.metrics import first_box_hit, iou


@pytest.mark.parametrize("a, b, expected", [
    ((0, 0, 1, 1), (0, 0, 1, 1), 1.0),
    ((0, 0, 1, 1), (1, 0, 2, 1), 0.0),            # touching edges
    ((0, 0, 2, 2), (0.5, 0.5, 1.5, 1.5), 0.25),   # contained
    ((0, 0, 1, 1), (0.5, 0, 1.5, 1), 1 / 3),
    ((0.5, 0.5, 0.5, 0.9), (0, 0, 1, 1), 0.0),    # zero area
    ((0, 0, 0, 0), (0, 0, 0, 0), 0.0),
])
def test_iou(a, b, expected):
    assert iou(a, b) == pytest.approx(expected)


def test_first_box_rule():
    target = (0.1, 0.1, 0.5, 0.5)
    assert first_box_hit([(0.1, 0.1, 0.5, 0.5), (0.9, 0.9, 1.0, 1.0)], target)
    assert not first_box_hit([(0.9, 0.9, 1.0, 1.0), (0.1, 0.1, 0.5, 0.5)], target)  # only the first counts
    assert not first_box_hit([], target)  # a parse failure is a miss
    assert first_box_hit([(0.1, 0.1, 0.45, 0.5)], target)  # IoU 0.875
    assert first_box_hit([(0.0, 0.0, 0.25, 0.5)], (0.0, 0.0, 0.5, 0.5))  # IoU exactly 0.5 counts (>=)
    assert not first_box_hit([(0.0, 0.0, 0.24, 0.5)], (0.0, 0.0, 0.5, 0.5))


def test_shapes_task_end_to_end(shapes_tfds, small_spm, tmp_path):
    save_tiny_checkpoint(tmp_path / "ckpt", small_spm)
    out = tmp_path / "eval" / "results.json"
    rc = evaluate.main(["--task", "shapes", "--checkpoint", str(tmp_path / "ckpt"), "--tokenizer", small_spm,
                        "--data_dir", str(shapes_tfds / "shapes" / "refexp" / "1.0.0"), "--split", "test",
                        "--max_examples", "5", "--batch_size", "4", "--out", str(out), "--draw", "2"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["count"] == 5 and 0.0 <= result["accuracy"] <= 1.0
    assert all({"expression", "target", "predicted", "iou", "hit", "text"} <= set(p) for p in result["predictions"])
    assert (tmp_path / "eval" / "example_1.png").is_file()
