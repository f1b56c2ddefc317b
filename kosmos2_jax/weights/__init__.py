"""Model weights: our params checkpoints (checkpoint.py, the one reader and writer of them) and
Hugging Face conversion (hf.py). The names below are the API callers use (`weights.load_model`)."""

from kosmos2_jax.weights.checkpoint import (abstract_params, iter_checkpoint_leaves, load_checkpoint,  # noqa: F401
                                            exported_step, read_json, read_model_config, restore_params, save_checkpoint,
                                            stored_abstract_params)
from kosmos2_jax.weights.hf import (DECODING, abstract_params_of, architecture_differences, config_from_hf,  # noqa: F401
                                    config_to_hf, export_hf, is_hf_folder, load_hf, load_model, load_params_for,
                                    model_config_of, params_from_hf, params_to_hf, state_dict_from_params, to_device)
