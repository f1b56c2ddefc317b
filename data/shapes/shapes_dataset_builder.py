"""shapes: the embedded synthetic grounded dataset (see kosmos2_jax/data/synthetic.py).

    tfds build data/shapes --data_dir ~/tensorflow_datasets                 # config "grounded"
    tfds build data/shapes --data_dir ~/tensorflow_datasets --config refexp

`grounded`: GRIT-schema records (key, image PNG bytes, caption, width, height, noun_chunks,
ref_exps), train/validation/test. `refexp`: one referring expression and its box per item, from
the same images (validation/test), for grounding evaluation. Sizes: SHAPES_NUM_TRAIN,
SHAPES_NUM_EVAL environment variables (defaults 4000 and 200), fixed into the config at build time.
"""

import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from kosmos2_jax.data.schema import grit_features
from kosmos2_jax.data.synthetic import make_example, refexp_examples

SEED = 0


def _sizes():
    return {"train": int(os.environ.get("SHAPES_NUM_TRAIN", 4000)),
            "validation": int(os.environ.get("SHAPES_NUM_EVAL", 200)),
            "test": int(os.environ.get("SHAPES_NUM_EVAL", 200))}


class Builder(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="grounded", description="grounded captions in the GRIT record schema"),
        tfds.core.BuilderConfig(name="refexp", description="one referring expression and its box per item"),
    ]

    def _info(self):
        if self.builder_config.name == "grounded":
            features = grit_features()
        else:
            features = tfds.features.FeaturesDict({
                "key": tfds.features.Text(),
                "image": tfds.features.Tensor(shape=(), dtype=tf.string),
                "width": tfds.features.Tensor(shape=(), dtype=np.int32),
                "height": tfds.features.Tensor(shape=(), dtype=np.int32),
                "expression": tfds.features.Text(),
                "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
            })
        return self.dataset_info_from_configs(features=features, homepage="https://github.com/",
                                              description=__doc__.split("\n")[0])

    def _split_generators(self, dl_manager):
        splits = ["train", "validation", "test"] if self.builder_config.name == "grounded" else ["validation", "test"]
        return {split: self._generate_examples(split, _sizes()[split]) for split in splits}

    def _generate_examples(self, split, count):
        for i in range(count):
            record = make_example(SEED, split, i)
            if self.builder_config.name == "grounded":
                yield record["key"], record
                continue
            for j, item in enumerate(refexp_examples(record)):
                yield f"{record['key']}-{j}", {"key": record["key"], "image": record["image"],
                                               "width": record["width"], "height": record["height"], **item}
