"""Tiny, randomly initialised nnU-Net v2 checkpoints laid out the way TotalSegmentator expects its
downloaded weights, so that TotalSegmentator's real inference path runs offline in the tests.

TotalSegmentator looks for a task's weights in ``<weights folder>/<dataset folder>/``
(``TOTALSEG_WEIGHTS_PATH``, otherwise ``~/.totalsegmentator/nnunet/results``) and downloads them only
when that folder is absent. Inside it nnU-Net v2 loads
``<trainer>__<plans>__<configuration>/{dataset.json, plans.json, fold_0/checkpoint_final.pth}``.
Here the plans describe the smallest plausible network (a two-stage plain U-Net with a handful of
feature maps and 16-voxel patches), and the segmentation head's weights are zero with one large
bias, so every voxel is predicted as one known label whatever the input: the tests then know
exactly what the segmentation must contain.

The folder names, trainers and spacings are read from TotalSegmentator's own task tables so that
the fake weights follow the installed version.
"""

from __future__ import annotations

import json
from pathlib import Path

PLANS_NAME = "nnUNetPlans"
CONFIGURATION = "3d_fullres"
PATCH_SIZE = [48, 48, 48]
CROP_MODEL_TRAINER = "nnUNetTrainer_4000epochs_NoMirroring"
"""Trainer of the 6 mm `total` model that TotalSegmentator runs first to crop for ``roi_subset``
(hard-coded in ``totalsegmentator.python_api``)."""


def dataset_folder(task_id: int) -> str:
    """Folder name of a TotalSegmentator dataset id inside the weights folder."""
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS

    info = TASK_ID_WEIGHTS_CONFIGS[task_id]
    folder = Path(info["foldername"])
    return str(Path(info["rel_path"]) / folder) if info.get("rel_path") else str(folder)


def _plans(dataset_name: str, spacing_mm: float) -> dict:
    resampling = "resample_data_or_seg_to_shape"
    return {
        "dataset_name": dataset_name,
        "plans_name": PLANS_NAME,
        "original_median_spacing_after_transp": [spacing_mm] * 3,
        "original_median_shape_after_transp": [64, 64, 64],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 3000.0, "mean": 100.0, "median": 80.0, "min": -1024.0,
                  "percentile_00_5": -1000.0, "percentile_99_5": 1500.0, "std": 300.0},
        },
        "configurations": {
            CONFIGURATION: {
                "data_identifier": f"{PLANS_NAME}_{CONFIGURATION}",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": PATCH_SIZE,
                "median_image_size_in_voxels": [64, 64, 64],
                "spacing": [spacing_mm] * 3,
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": resampling,
                "resampling_fn_seg": resampling,
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": resampling,
                "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                       "force_separate_z": None},
                "batch_dice": False,
                "architecture": {
                    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                    "arch_kwargs": {
                        "n_stages": 2,
                        "features_per_stage": [4, 8],
                        "conv_op": "torch.nn.modules.conv.Conv3d",
                        "kernel_sizes": [[3, 3, 3], [3, 3, 3]],
                        "strides": [[1, 1, 1], [2, 2, 2]],
                        "n_conv_per_stage": [1, 1],
                        "n_conv_per_stage_decoder": [1],
                        "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                        "dropout_op": None,
                        "dropout_op_kwargs": None,
                        "nonlin": "torch.nn.LeakyReLU",
                        "nonlin_kwargs": {"inplace": True},
                    },
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
            }
        },
    }


def write_constant_model(weights_dir, task_id: int, trainer: str, spacing_mm: float,
                         class_names: dict[int, str], label: int, seed: int = 0) -> Path:
    """Write a randomly initialised nnU-Net v2 model for TotalSegmentator dataset ``task_id`` that
    predicts ``label`` in every voxel. ``class_names`` maps the model's output ids to names (its
    ``dataset.json`` labels). Returns the model folder."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    if label not in class_names:
        raise ValueError(f"label {label} is not one of the model's classes")
    folder_name = dataset_folder(task_id)
    model_dir = Path(weights_dir) / folder_name / f"{trainer}__{PLANS_NAME}__{CONFIGURATION}"
    (model_dir / "fold_0").mkdir(parents=True, exist_ok=True)

    labels = {"background": 0}
    labels.update({name: int(index) for index, name in sorted(class_names.items())})
    dataset = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz",
               "name": Path(folder_name).name}
    plans = _plans(Path(folder_name).name, spacing_mm)
    (model_dir / "dataset.json").write_text(json.dumps(dataset, indent=1), encoding="utf-8")
    (model_dir / "plans.json").write_text(json.dumps(plans, indent=1), encoding="utf-8")

    architecture = plans["configurations"][CONFIGURATION]["architecture"]
    torch.manual_seed(seed)
    network = get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                     architecture["_kw_requires_import"], 1, len(labels),
                                     allow_init=True, deep_supervision=False)
    weights = network.state_dict()
    heads = [key for key in weights if key.startswith("decoder.seg_layers.")]
    assert heads, "the network has no segmentation head: the architecture changed"
    for key in heads:
        if key.endswith(".weight"):
            weights[key] = torch.zeros_like(weights[key])
        else:  # one output channel per label id: 0 = background
            bias = torch.full_like(weights[key], -10.0)
            bias[label] = 10.0
            weights[key] = bias
    checkpoint = {
        "network_weights": weights,
        "trainer_name": trainer,
        "init_args": {"configuration": CONFIGURATION},
        "inference_allowed_mirroring_axes": None,
    }
    torch.save(checkpoint, model_dir / "fold_0" / "checkpoint_final.pth")
    return model_dir


def write_fake_total_fast_weights(weights_dir, label: int, crop_label: int) -> None:
    """The weights TotalSegmentator needs for task ``total`` with ``fast`` and a ``roi_subset``:
    the 3 mm model (predicting ``label``) and the 6 mm model it runs first to crop the image
    around the requested classes (predicting ``crop_label``)."""
    from totalsegmentator.map_tasks_config import TASK_CONFIGS
    from totalsegmentator.map_to_binary import class_map

    fast = TASK_CONFIGS["total"]["sub_modes"]["fast"]
    fastest = TASK_CONFIGS["total"]["sub_modes"]["fastest"]  # the 6 mm model: also the crop model
    write_constant_model(weights_dir, fast["task_id"], fast["trainer"], float(fast["resample"]),
                         class_map["total"], label)
    write_constant_model(weights_dir, fastest["task_id"], CROP_MODEL_TRAINER, float(fastest["resample"]),
                         class_map["total"], crop_label, seed=1)


def write_fake_vertebrae_body_weights(weights_dir, label: int) -> None:
    """The weights of TotalSegmentator's ``vertebrae_body`` task, predicting ``label``."""
    from totalsegmentator.map_tasks_config import TASK_CONFIGS
    from totalsegmentator.map_to_binary import class_map

    task = TASK_CONFIGS["vertebrae_body"]
    write_constant_model(weights_dir, task["task_id"], task["trainer"], float(task["resample"]),
                         class_map["vertebrae_body"], label, seed=2)

