"""Training's own writes: a checkpoint that does not fit, or a folder that turns read-only, leaves the
previous checkpoint intact and says what to do in one line."""

import subprocess

import pytest
import torch

from skd.errors import DeviceError, SkdError
from skd.train.checkpoint import check_free_space, save_atomic


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 KiB tmpfs mounted on a fresh folder (needs root), unmounted afterwards."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 64 KiB tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def small_checkpoint() -> dict:
    return {"epoch": 3, "weights": torch.arange(16, dtype=torch.float32)}


def assert_previous_checkpoint_intact(path):
    left = sorted(p.name for p in path.parent.iterdir())
    assert left == [path.name], f"files left in {path.parent}: {left}, expected only {path.name}"
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 3 and torch.equal(loaded["weights"], torch.arange(16.0)), (
        f"the previous checkpoint now holds epoch {loaded['epoch']}, weights {loaded['weights'][:4]}..."
    )


def test_a_checkpoint_that_does_not_fit_keeps_the_previous_one(small_tmpfs):
    path = small_tmpfs / "checkpoint.pth"
    save_atomic(small_checkpoint(), path)
    with pytest.raises(DeviceError) as caught:
        save_atomic({"epoch": 4, "weights": torch.zeros(262_144)}, path)  # 1 MiB into 64 KiB
    message = str(caught.value)
    assert isinstance(caught.value, SkdError) and "\n" not in message, f"not a one-line SkdError: {message!r}"
    assert message.startswith(f"no space left on device writing {path}: free space, then rerun with --resume"), (
        f"message: {message}"
    )
    assert_previous_checkpoint_intact(path)


def test_a_folder_turned_read_only_keeps_the_previous_checkpoint(small_tmpfs):
    path = small_tmpfs / "checkpoint.pth"
    save_atomic(small_checkpoint(), path)
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    with pytest.raises(DeviceError) as caught:
        save_atomic({"epoch": 4, "weights": torch.zeros(4)}, path)
    assert str(caught.value).startswith(f"read-only file system writing {path}: make {small_tmpfs} writable"), (
        f"message: {caught.value}"
    )
    assert_previous_checkpoint_intact(path)


def test_free_space_check_refuses_a_checkpoint_larger_than_the_disk(tmp_path):
    out = tmp_path / "run" / "not-yet-created"  # a new --out: the check looks at the folder it will be in
    with pytest.raises(DeviceError) as caught:
        check_free_space(out, 10**18)  # an exabyte
    message = str(caught.value)
    assert (
        message.startswith(f"{out} has ")
        and "a checkpoint needs about 1,000,000,000,000.0 MB" in message
        and message.endswith("free space or choose another --out")
    ), f"message: {message}"
    check_free_space(out, 0)  # nothing needed: passes
    check_free_space(tmp_path, 1)


def test_a_checkpoint_with_the_multiplier_and_alpha_as_typed_resumes_with_them_as_numbers(tmp_path):
    """Checkpoints recorded --multiplier and --alpha as typed ("2", "0.9"); TrainConfig reads them as numbers: the
    same numbers resume, another is refused naming the option."""
    from skd.config import TrainConfig
    from skd.errors import OptionError
    from skd.train.checkpoint import load_for_resume

    settings = TrainConfig(cache="c", multiplier="2", alpha="0.9").settings()
    old = {**settings, "multiplier": "2", "alpha": "0.9"}
    torch.save({"identity": {"caches": []}, "settings": old}, tmp_path / "checkpoint.pth")
    resumed = load_for_resume(tmp_path / "checkpoint.pth", {"caches": []}, settings)
    assert resumed["settings"]["multiplier"] == "2", f"multiplier 2.0 did not resume a run saved with '2': {resumed}"
    other = {**settings, "multiplier": 3.0}
    with pytest.raises(OptionError, match="saved with --multiplier 2, not 3.0") as refused:
        load_for_resume(tmp_path / "checkpoint.pth", {"caches": []}, other)
    assert "\n" not in str(refused.value), f"not one line: {refused.value!r}"
