"""tfds dataset builders, one folder per dataset: `tfds build data/<name> --data_dir DIR`."""
