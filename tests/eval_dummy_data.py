"""Tiny annotation files and images for every evaluation task (tests/test_evaluate.py, and the
in-training evaluations of tests/test_experiments.py)."""

import json


def dummy_images(folder, names):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (64, 48), (40 * i % 255, 90, 160)).save(folder / name)


def dummy_task_data(task, root):
    root.mkdir(parents=True, exist_ok=True)
    if task.startswith("refcoco"):
        dummy_images(root / "images", ["a.jpg", "b.jpg"])
        images = [{"id": 1, "file_name": "a.jpg", "caption": "red circle", "width": 64, "height": 48},
                  {"id": 2, "file_name": "b.jpg", "caption": "blue square", "width": 64, "height": 48},
                  {"id": 3, "file_name": "gone.jpg", "caption": "green star", "width": 64, "height": 48}]
        if task.endswith("_reg"):  # a second expression of the first object
            images.append({"id": 4, "file_name": "a.jpg", "caption": "the round red one", "width": 64, "height": 48})
        data = {"images": images, "annotations": [{"image_id": im["id"], "bbox": [4, 4, 20, 20]} for im in images]}
        (root / f"finetune_{task.replace('_reg', '')}_val.json").write_text(json.dumps(data))
        if task.endswith("_reg"):  # demonstrations for k-shot REG come from the train split
            dummy_images(root / "images", ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
            train = [{"id": 10 + i, "file_name": f, "caption": c, "width": 64, "height": 48}
                     for i, (f, c) in enumerate([("c.jpg", "the left cup"), ("d.jpg", "a tall man"),
                                                 ("d.jpg", "the tall man in red"), ("a.jpg", "small dog")])]
            boxes = [[4, 4, 20, 20], [30, 2, 30, 40], [30, 2, 30, 40], [0, 0, 10, 10]]
            (root / "finetune_refcocog_train.json").write_text(json.dumps(
                {"images": train, "annotations": [{"image_id": im["id"], "bbox": b} for im, b in zip(train, boxes)]}))
    elif task == "flickr30k_entities":
        dummy_images(root / "images", ["a.jpg"])
        caption = "a red circle to the left of two blue squares"
        data = {"images": [{"id": 7, "file_name": "a.jpg", "caption": caption, "width": 64, "height": 48,
                            "tokens_positive_eval": [[[0, 12]], [[28, 44]]], "phrase_types": ["other", "people"]}],
                "annotations": [{"image_id": 7, "bbox": [1, 1, 10, 10], "tokens_positive": [[0, 12]]},
                                {"image_id": 7, "bbox": [30, 5, 10, 10], "tokens_positive": [[28, 44]]},
                                {"image_id": 7, "bbox": [45, 5, 10, 10], "tokens_positive": [[28, 44]]}]}
        (root / "final_flickr_separateGT_val.json").write_text(json.dumps(data))
    elif task.endswith("_caption"):
        dummy_images(root / "images", ["a.jpg", "b.jpg"])
        name = "dataset_flickr30k.json" if task.startswith("flickr") else "dataset_coco.json"
        data = {"images": [{"filename": f, "imgid": i, "split": "val",
                            "sentences": [{"raw": "a red circle"}, {"raw": "two blue squares"}]}
                           for i, f in enumerate(["a.jpg", "b.jpg"])]}
        (root / name).write_text(json.dumps(data))
    elif task == "vqav2":
        dummy_images(root / "images", ["COCO_val2014_000000000001.jpg"])
        qs = {"questions": [{"question_id": 11, "image_id": 1, "question": "what colour is the circle?"},
                            {"question_id": 12, "image_id": 1, "question": "how many squares?"}]}
        anns = {"annotations": [{"question_id": 11, "answers": [{"answer": "red"}] * 10},
                                {"question_id": 12, "answers": [{"answer": "two"}] * 10}]}
        (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(qs))
        (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(anns))
    elif task == "language":
        rows = [{"id": "c1", "task": "COPA", "context": "a red circle to the", "candidates": [" left", " right"], "label": 0},
                {"id": "b1", "task": "BoolQ", "context": "two blue squares", "candidates": [" yes", " no"], "label": 1}]
        (root / "val.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root
