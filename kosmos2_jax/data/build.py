"""Build a tfds dataset from a builder folder, like `tfds build` but without its Apache Beam import.

    python -m kosmos2_jax.data.build data/shapes --data_dir ~/tensorflow_datasets [--config grounded]
    python -m kosmos2_jax.data.build data/grit --data_dir DIR --manual_dir GRIT_RECORDS/

A builder folder holds `<name>_dataset_builder.py` defining `Builder`. The prepared dataset records
its `--manual_dir` (its files' names and sizes, `BUILT_FROM`): a build from other local files is refused,
naming what differs, unless `--overwrite` rebuilds it (tfds itself would keep the old one).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys

import tensorflow_datasets as tfds

from kosmos2_jax.utils.errors import UsageError


def load_builder_class(folder: str):
    """Import `<folder>/<name>_dataset_builder.py` as `<package>.<name>.<name>_dataset_builder` (tfds
    reads checksum/metadata files through the package, so the builder must live in one)."""
    folder = os.path.abspath(folder)
    name = os.path.basename(folder.rstrip("/"))
    if not os.path.isfile(os.path.join(folder, f"{name}_dataset_builder.py")):
        raise UsageError(f"no dataset builder {name}_dataset_builder.py in {folder!r}")
    package_dir = os.path.dirname(folder)
    root, package = os.path.dirname(package_dir), os.path.basename(package_dir)
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(f"{package}.{name}.{name}_dataset_builder").Builder


BUILT_FROM = "kosmos2_built_from.json"


def manual_dir_key(manual_dir: str | None) -> dict:
    """What a build read: the local files by name and size (not their bytes: a GRIT folder holds
    millions of images; nor their path: a moved folder is the same input)."""
    from kosmos2_jax.utils.outputs import listing_fingerprint

    return {"manual_dir": listing_fingerprint(manual_dir) if manual_dir else None}


def check_built_from(builder, key: dict, overwrite: bool) -> None:
    """Refuse (or with `overwrite`, remove) a prepared dataset built from other local files."""
    from kosmos2_jax.utils.outputs import key_differences

    prepared = os.path.isfile(os.path.join(builder.data_dir, "dataset_info.json"))
    if not prepared:
        return
    try:
        with open(os.path.join(builder.data_dir, BUILT_FROM)) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        saved = None
    if saved == key or (saved is None and key["manual_dir"] is None and not overwrite):
        return  # the same input; or built before inputs were recorded, by a builder that reads no local files
    if overwrite:
        shutil.rmtree(builder.data_dir)
        return
    why = "; ".join(key_differences(saved, key)) if saved is not None else "it records no --manual_dir"
    raise UsageError(f"{builder.data_dir} holds a dataset built from other input ({why}): pass --overwrite to "
                     "rebuild it, or another --data_dir (nothing has been changed)")


def build(folder: str, data_dir: str, config: str | None = None, manual_dir: str | None = None,
          overwrite: bool = False):
    builder_cls = load_builder_class(folder)
    if getattr(builder_cls, "MANUAL_DOWNLOAD_INSTRUCTIONS", None) and not manual_dir:
        first = builder_cls.MANUAL_DOWNLOAD_INSTRUCTIONS.strip().splitlines()[0]
        raise UsageError(f"{folder} reads local files: give them with --manual_dir ({first})")
    if config and config not in [c.name for c in builder_cls.BUILDER_CONFIGS]:
        raise UsageError(f"--config {config!r}: {folder} has configs {[c.name for c in builder_cls.BUILDER_CONFIGS]}")
    builder = builder_cls(data_dir=data_dir, config=config) if config else builder_cls(data_dir=data_dir)
    key = manual_dir_key(manual_dir)
    check_built_from(builder, key, overwrite)
    if overwrite and not os.path.isdir(builder.data_dir):  # tfds caches what it read of the old one
        builder = builder_cls(data_dir=data_dir, config=config) if config else builder_cls(data_dir=data_dir)
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    builder.download_and_prepare(download_config=download_config)
    with open(os.path.join(builder.data_dir, BUILT_FROM), "w") as f:
        json.dump(key, f)
    return builder


def main(argv=None) -> int:
    from kosmos2_jax.utils import cli

    parser = cli.ArgumentParser(prog="python -m kosmos2_jax.data.build", description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=cli.existing_dir, help="builder folder, e.g. data/shapes")
    parser.add_argument("--data_dir", required=True, type=cli.output_dir, help="tfds data folder to write into")
    parser.add_argument("--config", default=None, help="builder config (default: the builder's first)")
    parser.add_argument("--manual_dir", default=None, type=cli.existing_dir, help="local input files, for builders that read them")
    parser.add_argument("--overwrite", action="store_true",
                        help="rebuild a prepared dataset that was built from another --manual_dir (default: refuse)")
    args = parser.parse_args(argv)

    def run() -> int:
        builder = build(args.folder, args.data_dir, args.config, args.manual_dir, args.overwrite)
        for split, info in builder.info.splits.items():
            print(f"{builder.info.full_name} {split}: {info.num_examples} examples")
        print(f"data in {builder.data_dir}")
        return 0
    return cli.run(run)


if __name__ == "__main__":
    sys.exit(main())
