"""``vfscreen setup-segmentation`` (``segmentation_setup``): the pip commands it runs are the
package's own ``segment`` extra, the licence terms are shown and must be accepted, and weights
already present are found without any download (checked with the tiny fake checkpoints, offline)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from VertebralFractureScreenLib.segment import install as setup
from VertebralFractureScreenLib.errors import DependencyError

REPO = Path(__file__).resolve().parent.parent


def pyproject_segment_extra() -> list[str]:
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return data["project"]["optional-dependencies"]["segment"]


def normalised(requirement: str) -> str:
    return re.sub(r"\s+", "", requirement).lower()


def test_the_extra_installed_is_the_one_pyproject_declares():
    assert sorted(map(normalised, setup.segment_requirements())) == sorted(map(normalised, pyproject_segment_extra()))


def test_install_commands_keep_an_installed_torch_and_name_the_build_index():
    commands = setup.install_commands("cpu", python="PY")
    assert commands[-1][:4] == ["PY", "-m", "pip", "install"] and commands[-1][4:] == setup.segment_requirements()
    torch_commands = [c for c in commands if any(arg.startswith("torch==") for arg in c)]
    if setup.torch_installed():
        assert torch_commands == []  # a CUDA build someone installed is never replaced
    else:
        assert torch_commands[0][-2:] == ["--index-url", setup.TORCH_BUILDS["cpu"]]
    with pytest.raises(ValueError, match="unknown PyTorch build"):
        setup.install_commands("rocm")


def test_dry_run_shows_the_terms_and_the_commands_and_runs_nothing():
    said = []
    assert setup.setup_segmentation(dry_run=True, ask=lambda _: pytest.fail("asked"), say=said.append) == 0
    assert said[0] == setup.LICENCE_TERMS and "Apache-2.0" in said[0] and "openly available" in said[0]
    assert any("pip install" in line for line in said)
    assert "totalseg_download_weights -t total_fast" in said[-1]


def test_declining_the_terms_installs_nothing():
    with pytest.raises(DependencyError, match="not accepted"):
        setup.setup_segmentation(ask=lambda _: "n", say=lambda _: None)


def test_weights_present_are_not_downloaded_again(tmp_path, monkeypatch):
    pytest.importorskip("totalsegmentator", reason="TotalSegmentator is not installed (the segment extra)")
    pytest.importorskip("torch", reason="PyTorch is not installed")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fake_totalseg_weights as fake

    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path / "weights"))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "home"))
    absent = setup.weight_folders(["fast", "normal", "body"])
    assert all(absent.values()), absent  # an empty folder lacks everything
    fake.write_fake_total_fast_weights(tmp_path / "weights", label=1, crop_label=1)
    fake.write_fake_vertebrae_body_weights(tmp_path / "weights", label=1)
    absent = setup.weight_folders(["fast", "normal", "body"])
    assert absent["fast"] == [] and absent["body"] == [] and len(absent["normal"]) == 5  # the five 1.5 mm parts
    said = []
    assert setup.download_weights(["fast", "body"], say=said.append) == []
    assert all("present" in line for line in said) and len(said) == 2


def test_the_command_line_dry_run_and_bad_weights(capsys):
    from VertebralFractureScreenLib.cli import main

    assert main(["setup-segmentation", "--dry-run", "--weights", "fast"]) == 0
    out = capsys.readouterr().out
    assert "'fury<0.12'" in out and out.splitlines()[-1] == "then the weights: totalseg_download_weights -t total_fast"
    assert main(["setup-segmentation", "--weights", "fast,huge"]) == 2
    assert "choose from fast, normal, body" in capsys.readouterr().err
