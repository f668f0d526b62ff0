"""Getting segmentation ready in one step: PyTorch, TotalSegmentator and its model weights.

``vfscreen setup-segmentation`` (:func:`setup_segmentation`) installs, into the Python that runs
it:

1. PyTorch :data:`TESTED_TORCH` from PyTorch's own package index for the chosen build
   (:data:`TORCH_BUILDS`: ``cpu`` by default, or a CUDA build), unless a PyTorch is already
   installed: a CUDA build someone chose is never replaced;
2. the ``segment`` extra's requirements as this package declares them (TotalSegmentator, nnU-Net),
   read from the installed package's metadata so they are the tested pins;
3. the model weights screening uses (:data:`WEIGHT_TASKS`), after showing their licence terms
   (:data:`LICENCE_TERMS`), through TotalSegmentator's own download function, into its weights
   folder (``TOTALSEG_WEIGHTS_PATH`` or ``~/.totalsegmentator/nnunet/results``).

Screening itself never downloads anything unless asked (``vfscreen screen --download-weights``);
this is the one step that needs the internet. ``--dry-run`` prints the commands instead.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from importlib import metadata

from ..errors import DependencyError

DISTRIBUTION = "vertebral-fracture-screen"
TESTED_TORCH = "2.13.0"
"""The PyTorch version the ``segment`` extra is tested with (nnunetv2 2.6.0 loads its trainers with it)."""
TORCH_BUILDS = {
    "cpu": "https://download.pytorch.org/whl/cpu",
    "cu126": "https://download.pytorch.org/whl/cu126",
    "cu128": "https://download.pytorch.org/whl/cu128",
}
"""PyTorch's package index per build (CUDA 12.6 and 12.8 builds need an NVIDIA driver that supports them)."""

WEIGHT_TASKS = {"fast": "total_fast", "normal": "total", "body": "vertebrae_body"}
"""Segmentation quality (and the optional ``vertebrae_body`` map) → TotalSegmentator's download task."""

LICENCE_TERMS = (
    "TotalSegmentator (Wasserthal et al., Radiology: Artificial Intelligence 2023;5:e230024) is Apache-2.0 "
    "software; its tasks used here (total, total_fast, vertebrae_body) are openly available for any usage "
    "according to its README (tasks that need a licence are not used). It is not a medical device. When you "
    "publish results, cite TotalSegmentator and nnU-Net (Isensee et al., Nature Methods 2021;18:203-211)."
)


def segment_requirements() -> list[str]:
    """The ``segment`` extra's requirements of the installed package (markers removed)."""
    try:
        declared = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        raise DependencyError(f"the {DISTRIBUTION} package is not installed in {sys.executable}: install it first "
                              "(pip install -e . in its folder)") from None
    extra = re.compile(r""";\s*extra\s*==\s*["']segment["']\s*$""")
    return [extra.split(text)[0].strip() for text in declared if extra.search(text)]


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def install_commands(torch_build: str = "cpu", python: str = sys.executable) -> list[list[str]]:
    """The pip commands that install PyTorch (unless present) and the ``segment`` extra."""
    if torch_build not in TORCH_BUILDS:
        raise ValueError(f"unknown PyTorch build {torch_build!r} (choose from {', '.join(TORCH_BUILDS)})")
    commands = []
    if not torch_installed():
        commands.append([python, "-m", "pip", "install", f"torch=={TESTED_TORCH}",
                         "--index-url", TORCH_BUILDS[torch_build]])
    commands.append([python, "-m", "pip", "install", *segment_requirements()])
    return commands


def weight_folders(tasks) -> dict[str, list[str]]:
    """Per download task, the TotalSegmentator dataset folders it fetches that are absent."""
    from totalsegmentator.bin.totalseg_download_weights import TASK_TO_ID
    from totalsegmentator.config import get_weights_dir
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS

    root = get_weights_dir()
    absent = {}
    for task in tasks:
        names = []
        for dataset_id in TASK_TO_ID[WEIGHT_TASKS[task]]:
            info = TASK_ID_WEIGHTS_CONFIGS[dataset_id]
            folder = root / info.get("rel_path", "") / info["foldername"]
            if not folder.is_dir():
                names.append(info["foldername"])
        absent[task] = names
    return absent


def download_weights(tasks, say=print) -> list[str]:
    """Download the weights of ``tasks`` (keys of :data:`WEIGHT_TASKS`) that are absent; returns
    the dataset folders downloaded. A failed download is one sentence (:class:`DependencyError`)."""
    from totalsegmentator.bin.totalseg_download_weights import TASK_TO_ID
    from totalsegmentator.config import get_weights_dir, set_config_key, setup_totalseg
    from totalsegmentator.libs import download_pretrained_weights

    setup_totalseg()
    set_config_key("statistics_disclaimer_shown", True)
    fetched = []
    for task, names in weight_folders(tasks).items():
        if not names:
            say(f"weights for {task} ({WEIGHT_TASKS[task]}): present in {get_weights_dir()}")
            continue
        say(f"downloading the weights for {task} ({WEIGHT_TASKS[task]}: {', '.join(names)}) ...")
        try:
            for dataset_id in TASK_TO_ID[WEIGHT_TASKS[task]]:
                download_pretrained_weights(dataset_id)
        except Exception as error:  # network, disk or archive errors: one sentence
            raise DependencyError(f"downloading TotalSegmentator's {WEIGHT_TASKS[task]} weights into "
                                  f"{get_weights_dir()} failed ({type(error).__name__}: {error}); check the "
                                  "internet connection and the free disk space and run the command again") from None
        fetched += names
    return fetched


def setup_segmentation(*, torch_build: str = "cpu", tasks=("fast", "normal", "body"), dry_run: bool = False,
                       accept_licence: bool = False, ask=input, say=print) -> int:
    """Install PyTorch and the ``segment`` extra, show the weights' licence terms and download the
    weights. ``ask`` is asked once to accept the terms unless ``accept_licence``. Returns 0."""
    commands = install_commands(torch_build)
    say(LICENCE_TERMS)
    if dry_run:
        for command in commands:
            say(shlex.join(command))
        say("then the weights: " + ", ".join(f"totalseg_download_weights -t {WEIGHT_TASKS[t]}" for t in tasks))
        return 0
    if not accept_licence and ask("Accept these terms and download? [y/N] ").strip().lower() not in ("y", "yes"):
        raise DependencyError("not accepted: nothing was installed or downloaded")
    for command in commands:
        say(shlex.join(command))
        if subprocess.run(command).returncode != 0:
            raise DependencyError(f"installing failed: `{shlex.join(command)}` exited with an error (see pip's "
                                  "message above)")
    importlib.invalidate_caches()  # packages pip just installed
    if importlib.util.find_spec("totalsegmentator") is None:
        raise DependencyError("TotalSegmentator is still not importable after the install: start a new Python "
                              "and run the command again")
    download_weights(tasks, say=say)
    say("segmentation is ready: vfscreen screen CT --out DIR segments and screens")
    return 0
