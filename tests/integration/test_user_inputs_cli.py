"""A first-time user's mistakes and small data, through the CLI: one clear line with what to change, no traceback."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import BIN, ROOT, cli_env, run_cli, tiny_args


def one_line_error(proc: subprocess.CompletedProcess, code: int, *phrases: str) -> None:
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    for phrase in phrases:
        assert phrase in proc.stderr, proc.stderr[-2000:]


def test_empty_and_all_duplicate_prompt_files_are_refused_at_prepare(tmp_path: Path):
    empty, same = tmp_path / "empty.txt", tmp_path / "same.txt"
    empty.write_text("\n\n")
    same.write_text("red shirt\nRed  Shirt\nred shirt\n")
    proc = run_cli("prepare", *tiny_args(tmp_path / "a", prompts__path=empty), check=False)
    one_line_error(proc, 1, f"{empty}: no prompt to prepare (2 rows: 2 empty, 0 duplicates)")
    proc = run_cli("prepare", *tiny_args(tmp_path / "b", prompts__path=same), check=False)
    one_line_error(proc, 1, f"{same}: every row repeats one prompt (3 rows: 0 empty, 2 duplicates)")
    assert not (tmp_path / "a" / "prompts").exists() and not (tmp_path / "b" / "prompts").exists()


def test_an_empty_split_is_said_plainly_with_what_to_change(tmp_path: Path):
    no_train = tmp_path / "no-train"
    args = tiny_args(no_train, limit=12, prompts__val_fraction=0, prompts__test_fraction=1.0)
    run_cli("generate", *args)
    one_line_error(run_cli("train", *args, check=False), 1, "the train split is empty",
                   "lower prompts.val_fraction and prompts.test_fraction")
    no_test = tmp_path / "no-test"
    args = tiny_args(no_test, limit=12, prompts__val_fraction=0, prompts__test_fraction=0)
    run_cli("generate", *args)
    one_line_error(run_cli("evaluate", *args, check=False), 1, "the test split is empty",
                   "raise prompts.test_fraction")


def test_devices_and_caption_options_are_checked_like_config_keys(tmp_path: Path):
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    one_line_error(run_cli("generate", *tiny_args(tmp_path / "r", run__device="cuda"), check=False), 2,
                   "CUDA is not available on this machine")
    caption = ("caption", str(image), "--captioner", str(tmp_path), "--out", str(tmp_path / "c.jsonl"))
    one_line_error(run_cli(*caption, "--device", "cuda", check=False), 2, "CUDA is not available")
    one_line_error(run_cli(*caption, "--num-beams", "0", check=False), 2,
                   "--num-beams (evaluate.num_beams): must be >= 1, got 0")
    one_line_error(run_cli(*caption, "--batch-size", "-1", check=False), 2,
                   "--batch-size (evaluate.batch_size): must be >= 1, got -1")
    assert not (tmp_path / "c.jsonl").exists()


def test_ctrl_c_is_one_line_that_says_how_to_resume(tmp_path: Path):
    run_dir = tmp_path / "run"
    cmd = [str(BIN / "revprompt"), "generate", *tiny_args(run_dir, limit=60, generate__steps=300)]
    # Ctrl-C as a terminal delivers it, whatever the suite inherited (a shell that starts it in the background
    # without job control hands SIGINT down ignored, and Python keeps it ignored)
    proc = subprocess.Popen(cmd, env=cli_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list((run_dir / "shards").rglob("*.partial")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "generate interrupted on rank 0; rerun the same command to resume" in stderr
    assert "Traceback" not in stderr and not list((run_dir / "shards").rglob("*.partial"))


def test_config_prints_the_resolved_preset_with_its_docs():
    out = run_cli("config", "--config", "tiny", "--generate.steps=3").stdout
    assert 'model = "miniature"  # text-to-image model' in out and "steps = 3  # denoising steps" in out
    assert "height = 64" in out and "max_steps = 1000" in out  # the preset's values, not the defaults
    assert 'captioner = "miniature"' in out and 'image_model = "miniature"' in out and "retrieval = true" in out
