"""Distributed training: DDP, pipeline and ring all-reduce against one process / torch, hooks, launcher faults.

The equivalence proofs run for real: torchrun jobs of 2 processes (gloo on CPU) through
``workbench.distributed.launch``. The hooks' tensor math runs in this process (a world of one).
"""

import json
import os
import re
import signal
import socket
import time
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from workbench import WorkbenchError, load
from workbench.distributed import LaunchError, compress, launch, pipeline
from workbench.distributed.allreduce import expected_bytes, ring_schedule, simulate_ring
from workbench.distributed.ddp import DDPConfig, initial_model, shard_batches, train_single
from workbench.distributed.worker import backend_for
from workbench.models import build, load_checkpoint

HELPERS = {"PYTHONPATH": str(Path(__file__).parent)}  # tests/distributed_helpers.py as a module


def tagged(env: dict | None = None) -> tuple[dict, str]:
    """Environment for a launch whose processes carry a tag of their own (other runs may launch meanwhile)."""
    tag = uuid.uuid4().hex
    return {**(env or {}), "WORKBENCH_TEST_TAG": tag}, tag


def live_processes(tag: str) -> list[int]:
    """Pids of live (not zombie) processes whose environment carries `tag`."""
    needle = f"WORKBENCH_TEST_TAG={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if needle in env and state != "Z":
                pids.append(int(entry.name))
    return pids


# --- Data parallel: DDP on 2 processes == one process on the combined batches ---------------------

EQ = DDPConfig(epochs=2, max_steps=25, lr=0.05, momentum=0.0)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    results = launch("workbench.distributed.ddp", 2,
                     EQ.to_args() + ["--out", str(out / "ckpt.pt"), "--json", str(out / "results.json")],
                     progress=False)
    return out, results


def test_ddp_parameters_equal_single_process_training(ddp_run):
    out, results = ddp_run
    ddp_model, info = load_checkpoint(out / "ckpt.pt")
    data = load("digits")
    single = train_single(EQ, world_size=2, data=data)
    start = initial_model(EQ, data).state_dict()
    diff = max(float((a - b).abs().max()) for a, b in zip(ddp_model.state_dict().values(),
                                                          single.state_dict().values()))
    moved = max(float((p - start[n]).abs().max()) for n, p in single.state_dict().items())
    assert diff <= 1e-6
    assert moved > 1e-2, "the weights must have moved, or the comparison proves nothing"
    assert results[0]["runs"]["allreduce"]["steps"] == 25
    assert info["metadata"]["world_size"] == 2


def test_ddp_checkpoint_from_rank_0_only_and_json_per_rank(ddp_run):
    out, results = ddp_run
    assert sorted(p.name for p in out.glob("*.pt")) == ["ckpt.pt"]
    assert [r["runs"]["allreduce"].get("checkpoint") is not None for r in results] == [True, False]
    per_rank = [json.loads((out / f"results.rank{r}.json").read_text()) for r in (0, 1)]
    assert [(p["rank"], p["world_size"], p["backend"]) for p in per_rank] == [(0, 2, "gloo"), (1, 2, "gloo")]
    # Both replicas saw the same averaged loss and sent the same number of bytes.
    a, b = (p["runs"]["allreduce"] for p in per_rank)
    assert a["epochs"][-1]["train_loss"] == pytest.approx(b["epochs"][-1]["train_loss"])
    assert a["comm"]["sent_bytes"] == b["comm"]["sent_bytes"] > 0


def test_shards_partition_each_epoch():
    data = load("digits")
    cfg = DDPConfig(batch_size=32)
    shards = [torch.cat(shard_batches(data, cfg, 2, r, epoch=1)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1])  # equal local batches: DDP's mean == the combined mean
    n = len(data.y_train)
    assert set(torch.cat(shards).tolist()) == set(range(n))
    assert not torch.equal(shards[0], torch.cat(shard_batches(data, cfg, 2, 0, epoch=0)))  # reshuffled


def test_backend_follows_the_device():
    assert backend_for("cpu") == "gloo"
    assert backend_for("cuda:0") == "nccl"


# --- Pipeline parallel: 2 stages, GPipe and 1F1B ------------------------------------------------------

PIPE = pipeline.PipeConfig(hidden=64, depth=3, batch_size=64, micro_batches=8, repeats=1)


@pytest.fixture(scope="module")
def pipe_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe")
    results = launch("workbench.distributed.pipeline", 2, PIPE.to_args() + ["--save-grads", str(out)],
                     progress=False)
    return out, results


def test_pipeline_gradients_equal_single_process(pipe_run):
    out, results = pipe_run
    ref = pipeline.reference_grads(PIPE, *pipeline.batch(PIPE))
    stages = [torch.load(out / f"stage{r}.pt") for r in (0, 1)]
    assert set(stages[0]).isdisjoint(stages[1]) and set(stages[0]) | set(stages[1]) == set(ref)
    diff = max(float((g - ref[n]).abs().max()) for s in stages for n, g in s.items())
    assert diff <= 1e-6
    assert max(r["max_grad_diff"] for r in results) <= 1e-6  # each rank's own check, every step, both schedules


def test_pipeline_schedules_hold_fewer_activations_with_1f1b(pipe_run):
    _, results = pipe_run
    assert [r["gpipe"]["peak_in_flight"] for r in results] == [8, 8]
    assert [r["1f1b"]["peak_in_flight"] for r in results] == [2, 1]
    for r in results:
        assert r["bubble_formula"] == pytest.approx(1 / 9)
        for kind in pipeline.SCHEDULES:
            assert 0.0 <= r[kind]["bubble_measured"] < 1.0
            assert [op for op, *_ in r[kind]["timeline"]].count("F") == 8


@pytest.mark.parametrize("kind", pipeline.SCHEDULES)
@pytest.mark.parametrize(("p", "m"), [(2, 8), (3, 4), (4, 2)])
def test_schedule_runs_every_micro_batch_once_and_backward_after_forward(kind, p, m):
    for rank in range(p):
        ops = pipeline.schedule(kind, rank, p, m)
        assert sorted(ops) == sorted([("F", j) for j in range(m)] + [("B", j) for j in range(m)])
        assert all(ops.index(("F", j)) < ops.index(("B", j)) for j in range(m))


def test_split_stages_balances_the_weights():
    model = pipeline.build_full(pipeline.PipeConfig(hidden=256, depth=5))
    parts = pipeline.split_stages(model, 2)
    weights = [sum(p.numel() for _, m in part for p in m.parameters()) for part in parts]
    assert abs(weights[0] - weights[1]) / sum(weights) < 0.1
    with pytest.raises(WorkbenchError, match="stages"):
        pipeline.split_stages(model, 10)


# --- Ring all-reduce ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ring_run():
    # Occupy a port and ask the launcher for it: it must notice and pick another.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        results = launch("workbench.distributed.allreduce", 2, ["--sizes", "1,7,1000,100003", "--repeats", "1"],
                         port=port, progress=False)
    return port, results


def test_ring_allreduce_equals_dist_all_reduce(ring_run):
    _, results = ring_run
    rows = [row for r in results for row in r["sizes"]]
    assert len(rows) == 8
    assert max(row["max_abs_err"] for row in rows) <= 1e-6


def test_ring_allreduce_bytes_match_2_p_minus_1_over_p(ring_run):
    _, results = ring_run
    for r in results:
        big = next(row for row in r["sizes"] if row["numel"] == 100003)
        assert 0.95 <= big["sent_bytes"] / expected_bytes(100003, 4, 2) <= 1.1
        assert big["messages"] == 2  # p = 2: one reduce-scatter step and one all-gather step


def test_launcher_picks_another_port_when_the_one_asked_is_taken(ring_run):
    port, results = ring_run
    assert {r["master_port"] for r in results} != {port}
    assert len({r["master_port"] for r in results}) == 1


@pytest.mark.parametrize("p", [2, 3, 4, 5])
@pytest.mark.parametrize("numel", [1, 3, 10, 1001])
def test_ring_schedule_sums_for_any_world_size(p, numel):
    gen = torch.Generator().manual_seed(p * 100 + numel)
    tensors = [torch.randn(numel, generator=gen) for _ in range(p)]
    expected = torch.stack(tensors).sum(0)
    for out in simulate_ring(tensors):
        assert float((out - expected).abs().max()) <= 1e-5
    # Bytes each rank sends: the chunks of its schedule, 2(p-1)/p of the tensor up to uneven chunks.
    sizes = [len(c) for c in torch.empty(numel).tensor_split(p)]
    for rank in range(p):
        sent = 4 * sum(sizes[s] for _, s, _ in ring_schedule(rank, p))
        if numel % p == 0:
            assert sent == expected_bytes(numel, 4, p)
        if numel >= 100 * p:
            assert 0.95 <= sent / expected_bytes(numel, 4, p) <= 1.1


# --- Compression hooks: tensor math, and byte counts in a world of one --------------------------------


def test_topk_compress_matches_torch_topk():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    values, idx = compress.topk_compress(x, 37)
    ref = torch.topk(x.abs(), 37).indices
    assert set(idx.tolist()) == set(ref.tolist()) and idx.dtype == torch.int32
    assert torch.equal(values, x[idx.long()])
    assert torch.equal(compress.topk_decompress(values, idx, 1000).nonzero().flatten().sort().values,
                       idx.long().sort().values)


def test_error_feedback_delays_but_never_drops_gradient():
    gen = torch.Generator().manual_seed(1)
    residual, sent_total, grad_total = torch.zeros(500), torch.zeros(500), torch.zeros(500)
    for _ in range(30):
        g = torch.randn(500, generator=gen)
        values, idx, new_residual = compress.error_feedback_step(g, residual, k=10)
        sent = compress.topk_decompress(values, idx, 500)
        assert torch.equal(sent + new_residual, g + residual)  # exact: each entry is either sent or kept
        assert int((sent != 0).sum()) == 10 and torch.all(new_residual[idx.long()] == 0)
        residual, sent_total, grad_total = new_residual, sent_total + sent, grad_total + g
    assert torch.allclose(sent_total + residual, grad_total, atol=1e-4)


@pytest.fixture(scope="module")
def world_of_one(tmp_path_factory):
    store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _ddp_with_hook(name, group, **kw):
    model = build("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(32, 16), seed=0).train()
    ddp = DDP(model, process_group=group)
    stats = compress.CommStats(world_size=1)
    state, hook = compress.make_hook(name, group, **kw)
    buckets = []

    def recording(state, bucket):  # remembers which parameters the bucket holds, in its order
        buckets.append(bucket.parameters())
        return hook(state, bucket)

    ddp.register_comm_hook(state, compress.counted(recording, stats))
    return model, ddp, state, stats, buckets


def _backward(ddp, seed):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    torch.nn.functional.cross_entropy(ddp(x), y).backward()
    return x, y


def test_topk_hook_applies_topk_with_error_feedback(world_of_one):
    model, ddp, state, stats, buckets = _ddp_with_hook("topk", world_of_one, topk_ratio=0.05)
    ref = build("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(32, 16), seed=0).train()
    twin = {id(p): q for p, q in zip(model.parameters(), ref.parameters())}
    residual = None
    with compress.count_collectives(world_of_one, stats):
        for step in range(3):
            ddp.zero_grad(set_to_none=True)
            ref.zero_grad(set_to_none=True)
            x, y = _backward(ddp, step)
            torch.nn.functional.cross_entropy(ref(x), y).backward()
            assert len(buckets) == step + 1  # one bucket: the whole model
            order = buckets[-1]
            flat = torch.cat([twin[id(p)].grad.flatten() for p in order])  # the bucket's layout
            residual = torch.zeros_like(flat) if residual is None else residual
            k = max(1, round(0.05 * flat.numel()))
            values, idx, residual = compress.error_feedback_step(flat, residual, k)
            expected = compress.topk_decompress(values, idx, flat.numel())
            got = torch.cat([p.grad.flatten() for p in order])
            assert torch.allclose(got, expected, atol=1e-7)
            assert int((got != 0).sum()) == k
            assert torch.allclose(state.residuals[0], residual, atol=1e-7)
            with torch.no_grad():  # keep the two models equal for the next step
                for p in model.parameters():
                    twin[id(p)].copy_(p)
    # Per step: k float32 values and k int32 indices.
    assert stats.payload_bytes == 3 * 2 * 4 * k and stats.per_op == {"all_gather": 3 * 8 * k}


def test_fp16_and_powersgd_bytes_match_their_formulas(world_of_one):
    _, ddp, _, fp16, _ = _ddp_with_hook("fp16", world_of_one)
    with compress.count_collectives(world_of_one, fp16):
        _backward(ddp, 0)
    assert fp16.bucket_bytes == 4 * sum(p.numel() for p in ddp.parameters())
    assert fp16.payload_bytes * 2 == fp16.bucket_bytes  # half precision: exactly half the bytes

    model, ddp, _, psgd, _ = _ddp_with_hook("powersgd", world_of_one, powersgd_rank=2, powersgd_start_iter=2)
    with compress.count_collectives(world_of_one, psgd):
        for step in range(2):  # warm-up: plain all-reduce of the whole bucket
            _backward(ddp, step)
        warmup = psgd.payload_bytes
        _backward(ddp, 2)
    assert warmup == 2 * psgd.bucket_bytes // 3
    # After warm-up: each matrix n x m sends P (n x r) and Q (m x r); vectors (biases) go uncompressed.
    r = 2
    floats = sum((p.shape[0] + p[0].numel()) * r if p.dim() > 1 else p.numel() for p in model.parameters())
    assert psgd.payload_bytes - warmup == 4 * floats
    assert psgd.bucket_bytes / (4 * floats) > 4


def test_hook_errors_are_clear(world_of_one):
    with pytest.raises(WorkbenchError, match="unknown communication hook"):
        compress.make_hook("gzip", world_of_one)
    with pytest.raises(WorkbenchError, match="ratio"):
        compress.make_hook("topk", world_of_one, topk_ratio=0.0)
    with pytest.raises(WorkbenchError, match="unknown hook"):
        DDPConfig(hook="gzip")


# --- Launcher faults -----------------------------------------------------------------------------------


@pytest.mark.parametrize("nprocs", [0, -1, 1.5, "2", True])
def test_launch_rejects_bad_nprocs(nprocs):
    with pytest.raises(WorkbenchError, match="nprocs"):
        launch("workbench.distributed.ddp", nprocs, [])


def test_launch_rejects_a_string_of_args_and_a_bad_module():
    with pytest.raises(WorkbenchError, match="list of strings"):
        launch("workbench.distributed.ddp", 2, "--epochs 1")
    with pytest.raises(WorkbenchError, match="module"):
        launch("workbench/distributed/ddp.py", 2, [])


def test_the_collective_timeout_defaults_to_the_environment_and_is_checked(monkeypatch):
    monkeypatch.setenv("WORKBENCH_DIST_TIMEOUT_S", "soon")
    with pytest.raises(WorkbenchError, match=r"collective_timeout='soon' \(from \$WORKBENCH_DIST_TIMEOUT_S\)"):
        launch("workbench.distributed.ddp", 2, [])
    with pytest.raises(WorkbenchError, match="collective_timeout=0"):
        launch("workbench.distributed.ddp", 2, [], collective_timeout=0)


def test_a_rank_that_raises_is_named_with_its_error():
    seen = {}
    progress = lambda line: seen.setdefault("t", time.monotonic()) if line.startswith("[rank 1] step 1") else None
    env, tag = tagged(HELPERS)
    with pytest.raises(LaunchError) as err:
        launch("distributed_helpers", 2, ["--mode", "raise", "--rank", "1"], env=env, progress=progress)
    elapsed = time.monotonic() - seen["t"]
    assert "failed on rank 1 of 2: RuntimeError: injected failure on rank 1 at step 2" in str(err.value)
    assert err.value.failures[0].rank == 1 and err.value.failures[0].root_cause
    assert "raise RuntimeError" in err.value.failures[0].traceback
    assert elapsed < 15, f"reported {elapsed:.1f} s after the failure"
    assert live_processes(tag) == []


def test_a_rank_killed_mid_training_is_reported_fast_and_nothing_is_left():
    pids, killed = {}, {}

    def progress(line):
        if m := re.match(r"\[rank (\d+)\] pid (\d+)", line):
            pids[int(m.group(1))] = int(m.group(2))
        if line.startswith("[rank 1] allreduce epoch 1/") and not killed:
            os.kill(pids[1], signal.SIGKILL)  # as the out-of-memory killer would
            killed["t"] = time.monotonic()

    env, tag = tagged()
    with pytest.raises(LaunchError) as err:
        launch("workbench.distributed.ddp", 2, ["--epochs", "1000"], env=env, progress=progress, timeout=240)
    elapsed = time.monotonic() - killed["t"]
    assert "failed on rank 1 of 2: killed by SIGKILL" in str(err.value)
    assert err.value.failures[0].exitcode == -signal.SIGKILL
    assert elapsed < 15, f"reported {elapsed:.1f} s after the kill"
    assert live_processes(tag) == []
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]


def test_a_native_crash_is_named_with_the_python_stack_at_the_signal():
    env, tag = tagged(HELPERS)
    with pytest.raises(LaunchError) as err:
        launch("distributed_helpers", 2, ["--mode", "abort", "--rank", "1"], env=env, progress=False, timeout=120)
    message = str(err.value)
    assert "failed on rank 1 of 2: killed by SIGABRT (exit code -6): a fatal error in native code" in message
    assert "Python stacks at the signal (faulthandler):" in message and "distributed_helpers.py" in message
    assert live_processes(tag) == []


def test_a_crash_after_every_rank_wrote_its_results_keeps_them_and_warns():
    env, tag = tagged(HELPERS)
    with pytest.warns(RuntimeWarning, match=r"every rank wrote its results, then rank 1 killed by SIGABRT .* after "
                                            r"it had written its results .*; the results are complete and kept"):
        results = launch("distributed_helpers", 2, ["--mode", "abort-at-exit", "--rank", "1"], env=env,
                         progress=False, timeout=120)
    assert [r["rank"] for r in results] == [0, 1] and results[0]["sum"] == results[1]["sum"] == [32.0] * 4
    assert live_processes(tag) == []


def test_a_hung_peer_fails_its_collective_after_the_timeout():
    env, tag = tagged(HELPERS)
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as err:
        launch("distributed_helpers", 2, ["--mode", "hang", "--rank", "1"], env=env, collective_timeout=2,
               progress=False, timeout=120)
    assert "failed on rank 0 of 2" in str(err.value) and "Timed out" in str(err.value)
    assert time.monotonic() - t0 < 120
    assert live_processes(tag) == []


def test_a_hung_peer_in_a_group_of_its_own_times_out_too():
    # Groups beyond the default one (DDP's gradient group) time out like it, not after gloo's 30 minutes.
    env, tag = tagged(HELPERS)
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as err:
        launch("distributed_helpers", 2, ["--mode", "hang", "--rank", "1", "--group"], env=env,
               collective_timeout=2, progress=False, timeout=60)
    assert "failed on rank 0 of 2" in str(err.value) and "Timed out" in str(err.value)
    assert "(rank 1 did not respond within 2 s: stopped or hung)" in str(err.value)
    assert time.monotonic() - t0 < 60
    assert live_processes(tag) == []


def test_a_stopped_rank_ends_the_job_within_the_collective_timeout_and_is_named():
    pids, stopped = {}, {}

    def progress(line):
        if m := re.match(r"\[rank (\d+)\] pid (\d+)", line):
            pids[int(m.group(1))] = int(m.group(2))
        if line.startswith("[rank 1] allreduce epoch 1/") and not stopped:
            os.kill(pids[1], signal.SIGSTOP)  # frozen: it neither fails nor dies, and takes no SIGTERM
            stopped["t"] = time.monotonic()

    env, tag = tagged()
    t0 = time.monotonic()
    try:
        with pytest.raises(LaunchError) as err:
            launch("workbench.distributed.ddp", 2, ["--epochs", "1000"], env=env, progress=progress,
                   collective_timeout=5, timeout=120)
        ended = time.monotonic()
    finally:
        for pid in pids.values():  # never leave a stopped process behind, even when the test fails
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
    message = str(err.value)
    assert re.search(r"rank 1 did not respond within 5 s \(stopped or hung: its process \d+ was stopped", message), \
        message + "\n" + err.value.output[-4000:]
    assert "the job was ended and no process is left" in message and "\n" not in message
    assert err.value.failures[0].rank == 1 and err.value.failures[0].root_cause
    assert ended - stopped["t"] < 5 + 10, f"ended {ended - stopped['t']:.1f} s after the stop"
    assert ended - t0 < 60
    assert live_processes(tag) == []


def test_a_job_past_its_timeout_is_killed():
    env, tag = tagged(HELPERS)
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match="ran past its timeout of 8 s"):
        launch("distributed_helpers", 2, ["--mode", "sleep"], env=env, timeout=8, progress=False)
    assert time.monotonic() - t0 < 8 + 20  # the timeout plus the shutdown grace
    assert live_processes(tag) == []


def test_mismatched_world_size_is_a_clear_error():
    env, tag = tagged()
    with pytest.raises(LaunchError) as err:
        launch("workbench.distributed.pipeline", 2, ["--stages", "3"], env=env, progress=False)
    assert "needs exactly 3 processes but was launched with 2" in str(err.value)
    assert err.value.failures[0].root_cause and err.value.failures[0].rank in (0, 1)
    assert live_processes(tag) == []
