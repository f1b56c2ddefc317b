"""The tfds feature schema of GRIT-style records (reference §4.2), shared by the dataset builders.
Images are kept as encoded bytes so that the pipeline, not tfds, decides what a bad image is."""

import numpy as np


def grit_features():
    import tensorflow as tf
    import tensorflow_datasets as tfds

    return tfds.features.FeaturesDict({
        "key": tfds.features.Text(),
        "image": tfds.features.Tensor(shape=(), dtype=tf.string),
        "caption": tfds.features.Text(),
        "width": tfds.features.Tensor(shape=(), dtype=np.int32),
        "height": tfds.features.Tensor(shape=(), dtype=np.int32),
        "noun_chunks": tfds.features.Tensor(shape=(None, 7), dtype=np.float32),
        "ref_exps": tfds.features.Tensor(shape=(None, 7), dtype=np.float32),
    })
