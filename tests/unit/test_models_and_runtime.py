"""The Stable Diffusion factory (tiny and the from_pretrained path) and the single-process runtime helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from revprompt.generation.job import generate_batch, plan_shards, task_samples, to_pixels
from revprompt.generation.models import build_pipeline
from revprompt.generation.prompts import Prompt
from revprompt.launch import dist
from revprompt.launch.config import load_config


def cfg_for(**overrides):
    return load_config("tiny", [f"--{k.replace('__', '.')}={v}" for k, v in
                                dict(generate__steps=2, generate__height=32, generate__width=32, **overrides).items()])


def samples(n: int, seed: int = 0):
    prompts = {"train": [Prompt(id=f"p{i}", text=f"Nike Men Red T-shirt number {i}") for i in range(n)]}
    task = plan_shards({"train": n}, 1, 100)[0]
    return task_samples(task, prompts["train"], 1, seed)


@pytest.fixture(scope="module")
def pipe():
    # runtime behaviour needs shapes only: the random-initialised model (the miniature has its own tests)
    return build_pipeline("tiny-random")


def test_tiny_pipeline_has_no_safety_checker_and_uses_sdpa(pipe):
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert pipe.safety_checker is None
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    assert pipe.tokenizer.model_max_length == 77


def test_saved_pipeline_loads_through_from_pretrained_and_draws_the_same(tmp_path, pipe):
    cfg = cfg_for()
    pipe.save_pretrained(tmp_path / "sd")
    loaded = build_pipeline(str(tmp_path / "sd"))
    batch = samples(2)
    assert np.array_equal(to_pixels(generate_batch(pipe, batch, cfg))[0], to_pixels(generate_batch(loaded, batch, cfg))[0])


def test_images_depend_on_seed_not_batch_position(pipe):
    cfg = cfg_for()
    batch = samples(3)
    together = generate_batch(pipe, batch, cfg)
    reversed_ = generate_batch(pipe, batch[::-1], cfg).flip(0)
    torch.testing.assert_close(together, reversed_, atol=1e-5, rtol=0)
    assert not torch.allclose(together[0], together[1])


@pytest.mark.parametrize("scheduler", ["dpmsolver++", "euler", "ddim"])
def test_every_scheduler_and_negative_prompt(scheduler):
    cfg = cfg_for(generate__scheduler=scheduler)
    pipe = build_pipeline("tiny-random", scheduler=scheduler)
    batch = samples(1)
    plain = generate_batch(pipe, batch, cfg)
    pixels, finite = to_pixels(plain)
    assert plain.shape == (1, 3, 32, 32) and pixels.shape == (1, 32, 32, 3) and pixels.dtype == np.uint8
    assert finite.tolist() == [True]
    negative = generate_batch(pipe, batch, cfg_for(generate__scheduler=scheduler, generate__negative_prompt="blurry"))
    assert not torch.allclose(plain, negative)


def test_bf16_dtype():
    pipe = build_pipeline("tiny", dtype="bf16")
    assert pipe.unet.dtype == torch.bfloat16


def test_helpers_work_without_a_process_group():
    assert not torch.distributed.is_initialized()
    dist.barrier()
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
    assert dist.broadcast_object(5) == 5


def test_slurm_variables_map_to_torchrun_ones():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4(x2)",
           "SLURM_JOB_NODELIST": "gpu-[07-08]", "SLURM_JOB_ID": "1234", "PATH": ""}
    assert dist.map_slurm_env(env)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")} == \
        {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_PORT": "29734"}
    assert env["MASTER_ADDR"] in ("gpu-07",)  # from scontrol when present, else parsed
    torchrun_env = {"RANK": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert not dist.map_slurm_env(torchrun_env)  # torchrun already set the ranks
    assert dist.first_slurm_host("node1,node2") == "node1"
    assert dist.first_slurm_host("a[3,5-9]") == "a3"


def test_non_finite_images_are_flagged():
    images = torch.rand(3, 3, 8, 8)
    images[1, 0, 2, 2] = float("nan")
    pixels, finite = to_pixels(images)
    assert finite.tolist() == [True, False, True]
    assert np.array_equal(pixels[0], (images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def test_loop_clock_splits_model_and_host_time(monkeypatch):
    from revprompt.generation import job

    ticks = iter([10.0, 10.5, 12.5, 12.75, 15.0, 15.25])  # start, then (model start, model end) twice, stop
    monkeypatch.setattr(job.time, "perf_counter", lambda: next(ticks))
    clock = job.LoopClock()
    clock.model_starts()
    assert clock.model_ends() == 2.0
    clock.model_starts()
    assert clock.model_ends() == 2.25
    clock.stop()
    assert (clock.model_s, clock.host_s, clock.batches) == (4.25, 1.0, 2)
    assert clock.summary() == ("generating thread: 4.25 s in the model, 1.00 s elsewhere (19.0% of the loop) "
                               "over 2 batches")


def test_progress_reads_other_ranks_at_most_once_per_interval(tmp_path):
    from revprompt.generation.job import Progress

    folder = tmp_path / "progress"
    folder.mkdir()
    rank1 = Progress(folder, dist.DistInfo(1, 2, 1, torch.device("cpu")), total=100, interval_s=3600)
    main = Progress(folder, dist.DistInfo(0, 2, 0, torch.device("cpu")), total=100, interval_s=3600)
    try:
        assert rank1.add(10) == 10  # first call writes its file; a non-main rank knows only its own count
        assert main.add(5) == 15  # first call reads the others
        rank1.add(20, force=True)  # rank 1 at 30 now
        assert main.add(5) == 20  # within the interval: the last read (10) stands
        assert main.add(0, force=True) == 40  # a forced update reads again
        assert main.rate() > 0
    finally:
        main.close()


def test_restarts_over_a_shared_rendezvous_store_are_warned_about():
    shared = {"TORCHELASTIC_MAX_RESTARTS": "2", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in dist.restart_store_warning(shared)
    assert dist.restart_store_warning({**shared, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    assert dist.restart_store_warning({**shared, "TORCHELASTIC_MAX_RESTARTS": "0"}) is None
    assert dist.restart_store_warning({}) is None  # not under torchrun


def test_slurm_script_gives_each_restart_its_own_store():
    from pathlib import Path

    import revprompt.launch

    script = (Path(revprompt.launch.__file__).parent / "slurm" / "stage.sbatch").read_text()
    export = script.index("export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}")
    assert export < script.index("srun ")
