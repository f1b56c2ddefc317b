"""refcoco: RefCOCO, RefCOCO+ and RefCOCOg (configs) from MDETR's annotation files, as GRIT-style
records (caption = the expression; one noun chunk = the whole expression with its box).

    python -m kosmos2_jax.data.build data/refcoco --data_dir DIR --config refcoco --manual_dir MANUAL/

MANUAL/ holds `finetune_{config}_{split}.json` (MDETR, e.g. finetune_refcoco_testA.json) for any of
the splits train, val, testA, testB, test, and the COCO train2014 images in MANUAL/images/.
Items whose image is missing are skipped and counted (`builder.info.metadata["skipped_records"]`).
"""

import collections
import os

import tensorflow_datasets as tfds

from kosmos2_jax.data.grounding_builders import grit_records
from kosmos2_jax.data.schema import grit_features
from kosmos2_jax.evaluation.tasks import RefExpTask

SPLITS = ("train", "val", "testA", "testB", "test")


class Builder(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n) for n in ("refcoco", "refcoco+", "refcocog")]

    def _info(self):
        return self.dataset_info_from_configs(features=grit_features(), metadata=tfds.core.MetadataDict(),
                                              description=__doc__.split("\n")[0])

    def _split_generators(self, dl_manager):
        root = str(dl_manager.manual_dir)
        name = self.builder_config.name
        splits = [s for s in SPLITS if os.path.isfile(os.path.join(root, f"finetune_{name}_{s}.json"))]
        if not splits:
            raise FileNotFoundError(f"no finetune_{name}_{{{','.join(SPLITS)}}}.json in {root}")
        return {s: self._generate_examples(root, s) for s in splits}

    def _generate_examples(self, root, split):
        items = RefExpTask(self.builder_config.name).load(root, split)
        for it in items:
            it.update(caption=it["phrase"], span=[0, len(it["phrase"])], targets=[it["target"]])
        skipped = collections.Counter()
        yield from grit_records(items, os.path.join(root, "images"), skipped)
        if skipped:
            print(f"{self.builder_config.name} {split}: skipped {dict(skipped)}")
        self.info.metadata.setdefault("skipped_records", {})[split] = dict(skipped)
