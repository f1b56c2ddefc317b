"""flickr30k_entities: Flickr30k Entities phrase grounding from MDETR's annotation files, as
GRIT-style records (one per caption; each annotated phrase a noun chunk with all its boxes).

    python -m kosmos2_jax.data.build data/flickr30k_entities --data_dir DIR --manual_dir MANUAL/

MANUAL/ holds `final_flickr_separateGT_{train,val,test}.json` (any present) and the Flickr30k
images in MANUAL/images/. Items whose image is missing are skipped and counted.
"""

import collections
import os

import tensorflow_datasets as tfds

from kosmos2_jax.data.grounding_builders import grit_records
from kosmos2_jax.data.schema import grit_features
from kosmos2_jax.evaluation.tasks import FlickrEntitiesTask

SPLITS = ("train", "val", "test")


class Builder(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

    def _info(self):
        return self.dataset_info_from_configs(features=grit_features(), metadata=tfds.core.MetadataDict(),
                                              description=__doc__.split("\n")[0])

    def _split_generators(self, dl_manager):
        root = str(dl_manager.manual_dir)
        splits = [s for s in SPLITS if os.path.isfile(os.path.join(root, f"final_flickr_separateGT_{s}.json"))]
        if not splits:
            raise FileNotFoundError(f"no final_flickr_separateGT_{{{','.join(SPLITS)}}}.json in {root}")
        return {s: self._generate_examples(root, s) for s in splits}

    def _generate_examples(self, root, split):
        items = FlickrEntitiesTask().load(root, split)
        for it in items:
            it["record"] = it["id"].rsplit("_", 1)[0]  # one record per annotated caption
        skipped = collections.Counter()
        yield from grit_records(items, os.path.join(root, "images"), skipped)
        if skipped:
            print(f"flickr30k_entities {split}: skipped {dict(skipped)}")
        self.info.metadata.setdefault("skipped_records", {})[split] = dict(skipped)
