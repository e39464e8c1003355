"""Distributed training and evaluation on CPU with gloo: real launches of 2 processes.

Every launcher form runs: torch.distributed.launch with and without --use_env, torchrun with a
c10d rendezvous, torchrun on two "nodes" on localhost (static master address), and two tasks
started the way srun starts them. The launches are chained so that each checks several things:

    legacy --use_env, 2 processes      train epoch 0                 -> checkpoint A (2 ranks)
    one process                        resume A, train epoch 1       -> checkpoint B (1 rank)
    legacy without --use_env           resume B, train epoch 2       -> checkpoint C (2 ranks)
    2 nodes / srun / one process       evaluate C (--test-only)

tests/dist_worker.py is train.py with hooks that record batches, hang a rank or drop detections.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import FAST, ROOT, SMALL_MASKRCNN

import train
import utils
from errors import ConfigError

# One image per batch and an early rate step, on top of the shared quick run.
RUN_FLAGS = [
    *FAST, "-b", "1", "--lr-steps", "2",
    # Anchors the size of the demo's nuclei, and every detection kept: even a briefly trained
    # model then finds some.
    "--anchor-sizes", "8", "16", "32", "64", "128", "--box-score-thresh", "0",
]  # fmt: skip
LAUNCH_TIMEOUT = 300
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LEGACY = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=2"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # what the torchrun command runs
WORKER = os.path.join("tests", "dist_worker.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(**extra):
    """The test's environment without launcher or SLURM variables; one thread per worker."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCHER_VARIABLES and not k.startswith(("SLURM_", "DIST_TEST_"))
    }
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def run_ok(argv, env=None):
    result = subprocess.run(
        argv, cwd=ROOT, env=env or worker_env(), capture_output=True, text=True,
        timeout=LAUNCH_TIMEOUT,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def run_two_nodes(node_argv, script_argv, env=None):
    """Two launcher processes on localhost, as on two nodes with one process each."""
    return run_together(
        [
            ([*TORCHRUN, "--nnodes=2", "--nproc_per_node=1", *node_argv(node), *script_argv], env)
            for node in (0, 1)
        ]
    )


def run_together(commands):
    """Starts every (argv, env) at once and waits for all; each must exit 0. Their output."""
    processes = [
        subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env or worker_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for argv, env in commands
    ]
    outputs = [p.communicate(timeout=LAUNCH_TIMEOUT)[0] for p in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-4000:]
    return "".join(outputs)


def script_args(data_root, output_dir, *extra, model=SMALL_MASKRCNN):
    paths = ["--data-path", str(data_root), "--output-dir", str(output_dir)]
    return [*paths, *model, *RUN_FLAGS, *extra]


def read_log(output_dir):
    return [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]


def read_stats(output_dir):
    record = json.loads((output_dir / "eval.json").read_text())
    return {"bbox": record["bbox"], "segm": record["segm"]}


def read_results(output_dir):
    """The detections of the results files, in a fixed order (a tiny model's AP may be 0 while
    its detections still tell two evaluations apart)."""
    records = [
        json.dumps(record, sort_keys=True)
        for name in ("results_bbox.json", "results_segm.json")
        for record in json.loads((output_dir / name).read_text())
    ]
    return sorted(records)


RESULTS_FILES = ["results_bbox.json", "results_segm.json"]
TRAINING_FILES = ["model_0.pth", "checkpoint.pth", "model_best.pth", "log.jsonl", "config.toml"]


def assert_rank_0_alone_wrote(output_dir, names, output, evaluations=1):
    assert sorted(p.name for p in output_dir.iterdir()) == sorted(names + RESULTS_FILES)
    # Every rank would print these once per run or evaluation if printing were not gated.
    assert output.count("git revision:") == 1
    assert output.count("IoU metric: bbox") == evaluations
    assert output.count("no CUDA device found") == 1


@pytest.fixture(scope="module")
def legacy_with_env(demo_root, tmp_path_factory):
    """Ckpt A: epoch 0 in 2 processes, LOCAL_RANK from the environment."""
    output_dir = tmp_path_factory.mktemp("legacy_env")
    output = run_ok(
        [*LEGACY, f"--master_port={free_port()}", "--use_env", "train.py",
         *script_args(demo_root, output_dir, "--epochs", "1")]
    )  # fmt: skip
    return output_dir, output


@pytest.fixture(scope="module")
def single_resumed(demo_root, legacy_with_env, tmp_path_factory):
    """Ckpt B: ckpt A resumed for epoch 1 in one process."""
    output_dir = tmp_path_factory.mktemp("single")
    resume = legacy_with_env[0] / "checkpoint.pth"
    output = run_ok(
        [sys.executable, "train.py",
         *script_args(demo_root, output_dir, "--epochs", "2", "--resume", str(resume))]
    )  # fmt: skip
    return output_dir, output


@pytest.fixture(scope="module")
def legacy_without_env(demo_root, single_resumed, tmp_path_factory):
    """Ckpt C: ckpt B resumed for epoch 2 in 2 processes, given --local-rank=K."""
    output_dir = tmp_path_factory.mktemp("legacy_arg")
    resume = single_resumed[0] / "checkpoint.pth"
    output = run_ok(
        [*LEGACY, f"--master_port={free_port()}", "train.py",
         *script_args(demo_root, output_dir, "--epochs", "3", "--resume", str(resume))]
    )  # fmt: skip
    return output_dir, output


@pytest.mark.slow
def test_legacy_launcher_with_use_env_trains_and_evaluates(legacy_with_env):
    output_dir, output = legacy_with_env
    assert "distributed: 2 processes, backend gloo, env://" in output
    (record,) = read_log(output_dir)
    assert record["epoch"] == 0
    assert len(record["bbox"]) == len(record["segm"]) == 12
    assert all(v == v and abs(v) < 1e6 for v in record["train"].values())
    # 4 images, 1 per batch, 2 ranks: two iterations per rank.
    assert "Epoch: [0]  [1/2]" in output
    checkpoint = torch.load(output_dir / "checkpoint.pth", weights_only=True)
    assert checkpoint["iters_per_epoch"] == 2
    assert not any(k.startswith("module.") for k in checkpoint["model"])
    assert_rank_0_alone_wrote(output_dir, TRAINING_FILES, output)


@pytest.mark.slow
def test_checkpoint_of_two_processes_resumes_in_one(single_resumed):
    output_dir, output = single_resumed
    assert "iterations per epoch changed (2 -> 4)" in output
    (record,) = read_log(output_dir)
    assert record["epoch"] == 1 and record["lr"] == pytest.approx(0.01)
    assert torch.load(output_dir / "checkpoint.pth", weights_only=True)["iters_per_epoch"] == 4


@pytest.mark.slow
def test_legacy_launcher_without_use_env_resumes_a_single_process_checkpoint(
    legacy_without_env,
):
    output_dir, output = legacy_without_env
    assert "local_rank=0" in output  # the launcher's --local-rank=0 reached the parser
    assert "iterations per epoch changed (4 -> 2)" in output
    (record,) = read_log(output_dir)
    # --lr-steps 2: the replayed schedule drops the rate exactly at epoch 2.
    assert record["epoch"] == 2 and record["lr"] == pytest.approx(0.001)
    assert_rank_0_alone_wrote(output_dir, [*TRAINING_FILES[1:], "model_2.pth"], output)


@pytest.mark.slow
def test_torchrun_shards_every_training_batch_over_the_ranks(demo_root, tmp_path):
    record_dir = tmp_path / "batches"
    record_dir.mkdir()
    output_dir = tmp_path / "out"
    output = run_ok(
        [*TORCHRUN, "--nnodes=1", "--nproc_per_node=2", "--rdzv-backend=c10d",
         f"--rdzv-endpoint=127.0.0.1:{free_port()}", WORKER,
         *script_args(demo_root, output_dir, "--epochs", "1")],
        env=worker_env(DIST_TEST_RECORD_DIR=str(record_dir)),
    )  # fmt: skip
    ranks = [json.loads((record_dir / f"batches_{r}.json").read_text())["0"] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    # Step by step the ranks take disjoint slices; together they see every image once.
    for batch_0, batch_1 in zip(*ranks, strict=True):
        assert not set(batch_0) & set(batch_1)
    assert sorted(i for batches in ranks for batch in batches for i in batch) == [0, 1, 2, 3]
    assert [r["epoch"] for r in read_log(output_dir)] == [0]
    assert_rank_0_alone_wrote(output_dir, TRAINING_FILES, output)


@pytest.fixture(scope="module")
def evaluated_checkpoint(legacy_without_env):
    return legacy_without_env[0] / "checkpoint.pth"


def val_image_ids(data_root):
    annotations = json.loads((data_root / "annotations" / "instances_val2017.json").read_text())
    return sorted(image["id"] for image in annotations["images"])


def evaluate_in_one_process(data_root, checkpoint, output_dir, env=None):
    run_ok(
        [sys.executable, WORKER if env else "train.py",
         *script_args(data_root, output_dir, "--test-only", "--resume", str(checkpoint))],
        env=env,
    )  # fmt: skip
    return read_stats(output_dir)


@pytest.mark.slow
def test_two_node_evaluation_equals_single_process_on_odd_image_count(
    demo_root, evaluated_checkpoint, legacy_without_env, tmp_path
):
    port = free_port()
    distributed_dir = tmp_path / "distributed"
    output = run_two_nodes(
        lambda node: [f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}"],
        ["train.py", *script_args(
            demo_root, distributed_dir, "--test-only", "--resume", str(evaluated_checkpoint)
        )],
    )  # fmt: skip
    single = evaluate_in_one_process(demo_root, evaluated_checkpoint, tmp_path / "single")
    assert len(val_image_ids(demo_root)) % 2 == 1  # DistributedSampler pads rank 1's shard
    assert read_stats(distributed_dir) == single
    assert read_results(distributed_dir) == read_results(tmp_path / "single") != []
    # The evaluation during distributed training also matches: every rank used rank 0's weights.
    (record,) = read_log(legacy_without_env[0])
    assert {"bbox": record["bbox"], "segm": record["segm"]} == single
    assert_rank_0_alone_wrote(distributed_dir, ["eval.json"], output)


@pytest.mark.slow
def test_distributed_evaluation_of_a_unet_equals_single_process(
    demo_root, unet_checkpoint, tmp_path
):
    evaluation = ["--test-only", "--resume", str(unet_checkpoint), "--dsb-score"]
    evaluation += ["--error-analysis"]
    unet = ["--model", "unet_resnet18"]
    distributed_dir = tmp_path / "distributed"
    run_ok(
        [*TORCHRUN, "--nproc_per_node=2", f"--master_port={free_port()}", "train.py",
         *script_args(demo_root, distributed_dir, *evaluation, model=unet)]
    )  # fmt: skip
    single = script_args(demo_root, tmp_path / "single", *evaluation, model=unet)
    run_ok([sys.executable, "train.py", *single])
    distributed = json.loads((distributed_dir / "eval.json").read_text())
    single = json.loads((tmp_path / "single" / "eval.json").read_text())
    assert json.loads((tmp_path / "single" / "results_segm.json").read_text()), "no detections"
    for key in ("bbox", "segm", "dsb", "errors"):
        assert distributed[key] == single[key], key


def slurm_job_id_with_free_port():
    """A job id whose derived MASTER_PORT (see utils.slurm_master_address) is free here."""
    for job_id in range(os.getpid() % 20000, 20000 + os.getpid() % 20000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 20000 + job_id % 20000))
            except OSError:
                continue
        return job_id
    raise RuntimeError("no free port in 20000-39999")


def run_like_srun(script_argv, env):
    """Two tasks as `srun --ntasks=2` starts them: SLURM variables only, no launcher."""
    job_id = slurm_job_id_with_free_port()
    slurm = {"SLURM_NTASKS": "2", "SLURM_JOB_ID": str(job_id), "SLURM_JOB_NODELIST": "localhost"}
    return run_together(
        [
            (
                [sys.executable, *script_argv],
                {**env, **slurm, "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task)},
            )
            for task in (0, 1)
        ]
    )


@pytest.mark.slow
def test_srun_tasks_evaluate_like_one_process_when_a_rank_has_no_detections(
    demo_root, evaluated_checkpoint, tmp_path
):
    image_ids = val_image_ids(demo_root)
    sampler = torch.utils.data.DistributedSampler(image_ids, num_replicas=2, rank=1, shuffle=False)
    rank_1_ids = {image_ids[i] for i in sampler}
    assert len(rank_1_ids) < len(image_ids)
    env = worker_env(DIST_TEST_EMPTY_IDS=",".join(map(str, rank_1_ids)))
    distributed_dir = tmp_path / "distributed"
    output = run_like_srun(
        [WORKER, *script_args(
            demo_root, distributed_dir, "--test-only", "--resume", str(evaluated_checkpoint)
        )],
        env,
    )  # fmt: skip
    assert "distributed: 2 processes, backend gloo" in output
    single = evaluate_in_one_process(demo_root, evaluated_checkpoint, tmp_path / "single", env)
    assert read_stats(distributed_dir) == single
    # Rank 1's images have no detections: what is left are rank 0's, the same in both runs.
    assert read_results(distributed_dir) == read_results(tmp_path / "single") != []
    assert_rank_0_alone_wrote(distributed_dir, ["eval.json"], output)


@pytest.mark.slow
def test_a_stuck_rank_ends_the_launch_after_the_timeout(demo_root, tmp_path):
    timeout = 10
    start = time.monotonic()
    result = subprocess.run(
        [*TORCHRUN, "--standalone", "--nproc_per_node=2", WORKER,
         *script_args(demo_root, tmp_path, "--epochs", "1", "--dist-timeout", str(timeout))],
        cwd=ROOT, env=worker_env(DIST_TEST_HANG_RANK="1"), capture_output=True, text=True,
        timeout=LAUNCH_TIMEOUT,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    output = result.stdout + result.stderr
    assert result.returncode != 0
    # Rank 0 waits for rank 1 in its first collective, gives up, and torchrun stops rank 1.
    # gloo words it "Timed out waiting ..." or "Application timeout caused pair closure".
    assert re.search(r"timed out|application timeout", output, re.IGNORECASE), output[-4000:]
    assert timeout < elapsed < timeout + 90
    assert not (tmp_path / "checkpoint.pth").exists()


def test_launcher_environment_of_torchrun_and_slurm(monkeypatch):
    for name in (*LAUNCHER_VARIABLES, "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    assert utils.launcher_environment() is None
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    assert utils.launcher_environment() is None  # an interactive single-task allocation
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert utils.launcher_environment() == (5, 8, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert utils.launcher_environment(local_rank_arg=1) == (3, 4, 1)  # legacy --local-rank
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert utils.launcher_environment(local_rank_arg=1) == (3, 4, 0)


@pytest.mark.parametrize("flag", ["--local-rank=1", "--local_rank=1"])
def test_both_spellings_of_local_rank_parse(flag):
    assert train.get_args_parser().parse_args([flag]).local_rank == 1


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [
        ("node7", "node7"),
        ("gpu[03-05,09],cpu1", "gpu03"),
        ("a-[1-2]-b[7,9],z", "a-1-b7"),
        ("host-1.example.org,host-2.example.org", "host-1.example.org"),
    ],
)
def test_first_host_of_a_slurm_node_list_without_scontrol(nodelist, first, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol here
    assert utils.first_host(nodelist) == first


def test_slurm_master_address(monkeypatch, tmp_path):
    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\necho nodeB\necho nodeC\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    env = {"SLURM_JOB_NODELIST": "node[B-C]", "SLURM_JOB_ID": "4321987"}
    address, port = utils.slurm_master_address(env)
    assert address == "nodeB" and 1024 < int(port) < 65536
    assert utils.slurm_master_address(env) == (address, port)  # the same on every task
    assert utils.slurm_master_address({**env, "SLURM_JOB_ID": "4321988"})[1] != port
    env.update(MASTER_ADDR="10.0.0.1", MASTER_PORT="1234")
    assert utils.slurm_master_address(env) == ("10.0.0.1", "1234")
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        utils.slurm_master_address({"SLURM_JOB_ID": "1"})


def test_sync_bn_on_cpu_is_rejected():
    args = train.get_args_parser().parse_args(["--sync-bn", "--device", "cpu"])
    with pytest.raises(ConfigError, match="--sync-bn needs CUDA"):
        train.main(args)
