"""grit: GRIT-style grounded records with their images, from local files (manual_dir).

    python -m kosmos2_jax.data.build data/grit --data_dir DIR --manual_dir RECORDS/

RECORDS/ holds either
- record files `*.jsonl` or `*.parquet` (the released GRIT schema: key, caption, width, height,
  noun_chunks, ref_exps; other columns ignored) with images at `images/{key}.jpg` (or .png), as
  `kosmos2_jax.grit` writes them; image-caption metadata as published (COYO-700M `id, url, text,
  ...`, LAION-2B `URL, TEXT, ..., hash`: columns found as `kosmos2_jax.grit.records.COLUMNS`)
  becomes records without boxes (the `caption` source kind); or
- img2dataset webdataset shards `*.tar` holding `{key}.jpg` + `{key}.json` per record.
Every record becomes a `train` example. Records whose image is missing or undecodable are skipped
and counted (printed at the end of the build and kept in the dataset's metadata,
`builder.info.metadata["skipped_records"]`).
"""

import collections
import io
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from kosmos2_jax.data.schema import grit_features
from kosmos2_jax.grit.records import find_image, input_fields, iter_record_files, iter_tar_records


def _rows(value):
    arr = np.asarray([list(map(float, r)) for r in (value if value is not None else [])], np.float32)
    return arr.reshape(-1, 7)


def _image_ok(data):
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:  # PIL raises many types for bad files
        return False


class Builder(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

    def _info(self):
        return self.dataset_info_from_configs(
            features=grit_features(),
            metadata=tfds.core.MetadataDict(),
            description=__doc__.split("\n")[0])

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(str(dl_manager.manual_dir))}

    def _generate_examples(self, root):
        skipped = collections.Counter()
        for record in list(iter_record_files(root)) + list(iter_tar_records(root)):
            data = record.pop("_image", None)
            fields = input_fields(record)
            key = fields["key"]
            if data is None:
                path = find_image(os.path.join(root, "images"), key)
                data = open(path, "rb").read() if path else b""
            if not data:
                skipped["missing image"] += 1
                continue
            if not _image_ok(data):
                skipped["undecodable image"] += 1
                continue
            yield key, {"key": key, "image": data, "caption": fields["caption"],
                        "width": fields["width"], "height": fields["height"],
                        "noun_chunks": _rows(record.get("noun_chunks")), "ref_exps": _rows(record.get("ref_exps"))}
        print(f"grit: skipped {sum(skipped.values())} records: {dict(skipped)}")
        self.info.metadata["skipped_records"] = dict(skipped)
