"""Faults and bad input lose nothing: non-finite steps, restarts into a folder of old checkpoints, damaged
checkpoints, a resume under another data order, and hostile checkpoints handed over as someone's model."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import replace_section, tiny_config

from flexmore.store.checkpoint import CheckpointManager
from flexmore.store.modeldir import UntrustedCheckpoint, load_model
from flexmore.train import loop
from flexmore.train.loop import train


def poison_grads_at(monkeypatch, steps: set[int]):
    """Make one gradient NaN on the given steps (1-based), as an overflow in backward would."""
    real, calls = loop.clip_gradients, []

    def clip(params, max_norm):
        calls.append(1)
        if len(calls) in steps:
            params[0].grad.view(-1)[0] = float("nan")
        return real(params, max_norm)

    monkeypatch.setattr(loop, "clip_gradients", clip)


def weights_finite(model) -> bool:
    return all(torch.isfinite(p).all() for p in model.state_dict().values())


def test_a_non_finite_step_stops_keeps_the_last_good_checkpoint_and_resumes_bit_identically(tmp_path, monkeypatch):
    full = train(tiny_config(tmp_path / "a"))
    cfg = tiny_config(tmp_path / "b", train={"save_every": 3})
    poison_grads_at(monkeypatch, {7})
    with pytest.raises(FloatingPointError) as e:
        train(cfg)
    ck = tmp_path / "b" / "run" / "checkpoints"
    assert "step 7: the loss or gradient norm is not finite on rank(s) [0]" in str(e.value)
    assert f"the last good checkpoint is {ck / 'step_00000006'}" in str(e.value)
    assert "train.nonfinite=skip" in str(e.value)
    assert CheckpointManager(ck).steps() == [3, 6]  # nothing written after the fault, nothing good pruned
    assert weights_finite(load_model(ck / "step_00000006", trust_checkpoint=True))
    monkeypatch.undo()
    rest = train(cfg)
    assert rest.resumed_from == 6
    assert all(rest.losses[s] == full.losses[s] for s in range(7, 13))
    for (n, p), (_, q) in zip(full.model.named_parameters(), rest.model.named_parameters()):
        assert torch.equal(p, q), n


def test_the_skip_policy_skips_a_non_finite_step_and_stops_after_too_many_in_a_row(tmp_path, monkeypatch):
    poison_grads_at(monkeypatch, {7})
    res = train(tiny_config(tmp_path / "a", train={"nonfinite": "skip"}))
    assert res.skipped == [7] and res.final_step == 12 and weights_finite(res.model)
    monkeypatch.undo()
    poison_grads_at(monkeypatch, set(range(3, 13)))
    with pytest.raises(FloatingPointError, match=r"\(4 such steps in a row, train.max_skips=3\)"):
        train(tiny_config(tmp_path / "b", train={"nonfinite": "skip", "max_skips": 3}))


def test_a_diverging_run_never_saves_non_finite_weights(tmp_path):
    """lr 1e6: the weights blow up; every checkpoint on disk is finite and the run stops naming the last one."""
    cfg = tiny_config(tmp_path, optim={"lr": 1e6, "grad_clip": 0.0, "warmup_steps": 0},
                      train={"steps": 30, "save_every": 1, "keep_last": 2})
    with pytest.raises(FloatingPointError, match="not finite|non-finite values; not saving them") as e:
        train(cfg)
    mgr = CheckpointManager(tmp_path / "run" / "checkpoints")
    for step in mgr.steps():
        assert weights_finite(load_model(mgr.path(step), trust_checkpoint=True)), step
    if mgr.steps():
        assert str(mgr.latest()) in str(e.value)


def test_weights_that_went_non_finite_in_the_update_are_not_saved(tmp_path, monkeypatch):
    real = torch.optim.AdamW.step

    def step(self, *a, **k):  # the update of step 4 overflows
        out = real(self, *a, **k)
        p = self.param_groups[0]["params"][0]
        if int(self.state[p].get("step", 0)) == 4:
            p.data.view(-1)[0] = float("inf")
        return out

    cfg = tiny_config(tmp_path, train={"steps": 4, "save_every": 2})
    train(replace_section(cfg, "train", steps=2))
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(FloatingPointError, match=r"step 4: the weights hold non-finite values; not saving them, the "
                                                 r"last good checkpoint is .*step_00000002"):
        train(cfg)
    assert CheckpointManager(tmp_path / "run" / "checkpoints").steps() == [2]


def test_resume_never_in_a_folder_of_old_checkpoints_is_refused_and_deletes_nothing(tmp_path):
    cfg = tiny_config(tmp_path, train={"steps": 6, "save_every": 3})
    train(cfg)
    with pytest.raises(ValueError, match=r"train.resume=never, but .* holds checkpoints of an earlier run \(steps "
                                         r"\[3, 6\]\)"):
        train(replace_section(cfg, "train", resume="never", steps=2))
    assert CheckpointManager(tmp_path / "run" / "checkpoints").steps() == [3, 6]


def test_a_damaged_checkpoint_is_named_and_the_one_before_it_used(tmp_path, capsys):
    full = train(tiny_config(tmp_path / "a", train={"steps": 9}))
    cfg = tiny_config(tmp_path / "b", train={"steps": 6, "save_every": 3})
    train(cfg)
    step6 = tmp_path / "b" / "run" / "checkpoints" / "step_00000006"
    shard = next(p for p in step6.iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    for i in range(64):  # flip bits in the middle, where the tensors are
        data[len(data) // 2 + i] ^= 0xFF
    shard.write_bytes(bytes(data))
    rest = train(replace_section(cfg, "train", steps=9))
    assert f"checkpoint {step6} is damaged ({shard.name} does not match its checksum)" in capsys.readouterr().out
    assert rest.resumed_from == 3
    assert all(rest.losses[s] == full.losses[s] for s in range(4, 10))
    # garbage meta.json: also damaged, not a crash
    (step6 / "meta.json").write_text("{not json")
    assert "meta.json unreadable" in CheckpointManager.damage(step6)


@pytest.mark.parametrize("section, change, named", [
    ("data", {"seed": 1}, "data.seed: checkpoint 0 vs now 1"),
    ("train", {"micro_batch": 2}, "global batch (train.micro_batch x train.grad_accum x ranks): checkpoint 4 vs now 2"),
])
def test_resuming_under_another_data_order_is_refused_unless_forced(tmp_path, section, change, named):
    cfg = tiny_config(tmp_path, train={"steps": 6, "stop_at": 3})
    train(cfg)
    changed = replace_section(replace_section(cfg, "train", stop_at=None), section, **change)
    with pytest.raises(ValueError, match=r"cannot resume the data order: " + named.replace("(", r"\(").replace(")", r"\)")):
        train(changed)
    res = train(replace_section(changed, "train", force_resume=True))
    assert res.resumed_from == 3 and res.final_step == 6


class Planted:
    """What a hostile .metadata could hold: unpickling it calls Path.touch on a marker (it could run anything)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def hostile_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """A real base run whose latest checkpoint's .metadata was swapped for a pickle that runs code."""
    cfg = tiny_config(tmp_path / "base", train={"steps": 2})
    train(replace_section(cfg, "train", save_model=False))
    step = tmp_path / "base" / "run" / "checkpoints" / "step_00000002"
    marker = tmp_path / "PWNED"
    (step / ".metadata").write_bytes(pickle.dumps(Planted(marker)))
    return step, marker


def test_a_planted_checkpoint_pickle_is_never_run_by_what_takes_another_partys_model(tmp_path, capsys):
    from flexmore.cli import eval as eval_cli
    from flexmore.cli import lowrank, merge, sweep, tune_router
    from flexmore.experts.training import train_expert

    step, marker = hostile_checkpoint(tmp_path)
    run = step.parent.parent  # the run folder: it has no model folder, so its latest checkpoint would be read
    for target in (step, run):
        for main, args in ((merge.main, ["--base", str(target), "--experts", str(tmp_path), "--out", str(tmp_path / "m")]),
                           (merge.main, ["--merged", str(target), "--out", str(tmp_path / "m")]),
                           (eval_cli.main, ["--model", str(target), "--out", str(tmp_path / "e")]),
                           (lowrank.main, ["--base", str(target), "--expert", str(tmp_path), "--ranks", "2",
                                           "--out", str(tmp_path / "l")]),
                           (tune_router.main, ["--merged", str(target), "--sample", "public=embedded:public",
                                               "--seq-len", "32", "--out", str(tmp_path / "t")]),
                           (sweep.main, ["--base", str(target), "--experts", str(tmp_path), "--out", str(tmp_path / "s")])):
            assert main(args) != 0, (main.__module__, args)
            assert "is a training checkpoint (DCP)" in capsys.readouterr().err, (main.__module__, target)
        cfg = tiny_config(tmp_path / "x")
        cfg.expert.base, cfg.expert.name = str(target), "math"
        with pytest.raises(UntrustedCheckpoint, match="expert.trust_checkpoint=true"):
            train_expert(cfg)
        assert not marker.exists()
    # the plant is real: trusting the checkpoint runs it (what every entry point above refused to do)
    with pytest.raises(BaseException):  # DCP's CheckpointException is a BaseException
        load_model(step, trust_checkpoint=True)
    assert marker.exists()


def test_a_finished_run_hands_over_a_model_folder_and_own_checkpoints_convert(tmp_path):
    from flexmore.cli import convert

    res = train(tiny_config(tmp_path, train={"steps": 3}))
    run = tmp_path / "run"
    assert res.model_dir == run / "model" and (run / "model" / "model.safetensors").is_file()
    m = load_model(run)  # the run folder resolves to its model folder: no trust needed
    for (n, p), (_, q) in zip(res.model.state_dict().items(), m.state_dict().items()):
        assert torch.equal(p, q), n
    assert convert.main(["--checkpoint", str(run / "checkpoints" / "step_00000003"), "--out", str(tmp_path / "c")]) == 0
    c = load_model(tmp_path / "c")
    assert all(torch.equal(p, q) for p, q in zip(m.state_dict().values(), c.state_dict().values()))
    assert json.loads((tmp_path / "c" / "config.json").read_text())["model"]["d_model"] == m.cfg.d_model
    # the length it was trained at goes along: from the checkpoint's meta, as from the run's own model folder
    from flexmore.store.modeldir import trained_info

    assert trained_info(tmp_path / "c") == trained_info(run) == {"seq_len": 32}


@pytest.mark.parametrize("override, match", [
    ({"lr": float("inf")}, "optim.lr=inf must be a finite number > 0"),
    ({"grad_clip": float("nan")}, "optim.grad_clip=nan must be a finite number"),
    ({"weight_decay": -0.1}, "optim.weight_decay=-0.1 must be >= 0"),
])
def test_optimizer_numbers_that_cannot_work_fail_at_config(tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(tmp_path, optim=override)


def job_stalled_peer(tmp: str) -> None:
    """Rank 1 freezes (SIGSTOP) while loading step 3's data; rank 0 must give up after parallel.timeout_s and say
    which rank stopped where. Rank 0 raises (that ends the test harness at once); rank 1 never answers."""
    import os
    import signal
    import time

    from flexmore.config import ParallelConfig
    from flexmore.data.loader import SequenceLoader

    rank, real, calls = int(os.environ["RANK"]), SequenceLoader.next_step, []

    def next_step(self):
        calls.append(1)
        if rank == 1 and len(calls) == 3:
            os.kill(os.getpid(), signal.SIGSTOP)
        return real(self)

    SequenceLoader.next_step = next_step
    cfg = tiny_config(Path(tmp), train={"steps": 6, "eval_every": 6},
                      parallel=ParallelConfig(replicate=1, shard=2, timeout_s=3))
    t0 = time.monotonic()
    try:
        train(cfg)
    except RuntimeError as e:
        raise RuntimeError(f"STALL-REPORT after {time.monotonic() - t0:.1f}s: {e}") from None
    raise AssertionError(f"rank {rank} finished although a peer stalled")


def test_a_stalled_peer_ends_the_run_within_the_timeout_naming_it(tmp_path):
    import re

    from distributed import run_distributed_test

    with pytest.raises(AssertionError) as e:
        run_distributed_test(job_stalled_peer, 2, str(tmp_path), timeout=120)
    text = str(e.value)
    assert "rank 0:" in text and "STALL-REPORT" in text, text[-3000:]
    assert "a collective waited longer than parallel.timeout_s=3s: rank 1 stopped reporting at step 3 (loading data) " \
           "(the others reached step 3 (forward and backward))" in text, text[-3000:]
    assert "no checkpoint was saved yet: restart the job to resume from it" in text
    assert float(re.search(r"STALL-REPORT after ([0-9.]+)s", text).group(1)) < 60


def worker_pids(run_dir: Path) -> dict[int, int]:
    """RANK -> pid of the training workers whose command line names ``run_dir``."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_bytes().decode().split("\0") if "=" in kv)
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if "flexmore.cli.train" in cmd and str(run_dir) in cmd and "RANK" in env and "torch.distributed.run" not in cmd:
            out[int(env["RANK"])] = int(proc.name)
    return out


@pytest.mark.slow
def test_a_killed_worker_restarts_under_the_shipped_launch_and_ends_with_the_same_weights(tmp_path):
    """Two agents x 2 workers (launch/two_agents_cpu.sh, MAX_RESTARTS=1); rank 1 is killed after the first checkpoint:
    the job restarts, resumes from that checkpoint and ends with the weights of a run that was never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    script = Path(__file__).resolve().parents[1] / "launch" / "two_agents_cpu.sh"
    args = ["experiment=smoke", "optim=flexdemo", "optim.demo.chunk=16", "optim.demo.topk=8", "train.steps=40",
            "train.save_every=10", "train.eval_every=40"]
    env = {**os.environ, "NPROC_PER_NODE": "2", "PYTHON": sys.executable, "MAX_RESTARTS": "1"}
    ref = subprocess.run(["bash", str(script), *args, f"hydra.run.dir={tmp_path}/ref"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "run"
    job = subprocess.Popen(["bash", str(script), *args, f"hydra.run.dir={run}"], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, killed = time.monotonic() + 300, None
    while time.monotonic() < deadline and job.poll() is None:
        if (run / "checkpoints" / "step_00000010" / "meta.json").is_file():
            pids = worker_pids(run)
            if 1 in pids:
                os.kill(pids[1], signal.SIGKILL)
                killed = pids[1]
                break
        time.sleep(0.05)
    out, _ = job.communicate(timeout=600)
    assert killed is not None, "the run ended before a worker could be killed: " + out[-2000:]
    assert job.returncode == 0, out[-4000:]
    assert "resumed from" in out and "step_00000010" in out.split("resumed from", 1)[1][:200], out[-4000:]
    got, want = load_file(run / "model" / "model.safetensors"), load_file(tmp_path / "ref" / "model" / "model.safetensors")
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("content, match", [
    (b'{"text": "a"}\n{"text": "b"}\n{"text": "c"\n', r"bad\.jsonl:3: not a JSON object \("),
    (b'{"text": "a"}\n42\n', r"bad\.jsonl:2: a JSON int, not an object with a 'text' field"),
    (b'{"text": ["a"]}\n', r"bad\.jsonl:1: field 'text' is a list, not text"),
    (b'{"text": "a"}\n\xff\xfe\x00binary\n', r"bad\.jsonl:2: not UTF-8 .*binary file"),
])
def test_bad_jsonl_input_names_the_file_and_line(tmp_path, content, match):
    from flexmore.data.prep import prepare
    from flexmore.data.tokenizer import ByteTokenizer

    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(ValueError, match=match):
        prepare([tmp_path / "bad.jsonl"], tmp_path / "out", ByteTokenizer())
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_a_binary_txt_input_is_named(tmp_path):
    from flexmore.data.prep import prepare
    from flexmore.data.tokenizer import ByteTokenizer

    (tmp_path / "x.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xff")
    with pytest.raises(ValueError, match=r"x\.txt: not UTF-8 text .*binary file"):
        prepare([tmp_path / "x.txt"], tmp_path / "out", ByteTokenizer())


def shard_folder(tmp_path):
    from flexmore.data.shards import write_documents

    return write_documents(tmp_path / "d", [list(range(10, 60))] * 20, vocab_size=256, eos_id=255, tokenizer="byte")


def test_an_index_that_lies_is_caught_with_the_folder_named(tmp_path):
    from flexmore.data.shards import TokenStream

    folder = shard_folder(tmp_path)
    index = json.loads((folder / "index.json").read_text())
    lying = dict(index, shards=[dict(sh, num_tokens=sh["num_tokens"] + 100) for sh in index["shards"]])
    (folder / "index.json").write_text(json.dumps(lying))
    with pytest.raises(ValueError, match=r"but .*index\.json says .* tokens .*the folder is damaged"):
        TokenStream([folder])
    (folder / "index.json").write_text(json.dumps(dict(index, max_token_id=20)))
    stream = TokenStream([folder])
    with pytest.raises(ValueError, match=r"token id \d+ at tokens \[0, 64\) is above the max_token_id 20 of its index\.json"):
        stream.read(0, 64)
    (folder / "index.json").write_text('{"version": ')
    with pytest.raises(ValueError, match=r"index\.json is not valid JSON"):
        TokenStream([folder])


def test_a_truncated_expert_artifact_is_named_and_merge_top_k_is_checked(tmp_path):
    from conftest import tiny_config as tc

    from flexmore.experts.artifact import TENSORS, load_artifact
    from flexmore.experts.training import train_expert

    train(tc(tmp_path / "base", train={"steps": 2}))
    cfg = tc(tmp_path / "e", data={"domains": ["math"]}, train={"steps": 2})
    cfg.expert.base, cfg.expert.name, cfg.expert.router_init_batches = str(tmp_path / "base" / "run"), "math", 1
    art = train_expert(cfg).artifact
    from flexmore.experts.merge import merge

    with pytest.raises(ValueError, match=r"top_k=3: the merged model has 2 experts \(public \+ 1\); allowed 1\.\.2"):
        merge(tmp_path / "base" / "run", [art], top_k=3)
    data = (art / TENSORS).read_bytes()
    (art / TENSORS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"expert artifact .* \('math'\): expert\.safetensors cannot be read .*damaged"):
        load_artifact(art)


def test_a_full_disk_says_so_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from flexmore.store import checkpoint as ckpt_mod

    cfg = tiny_config(tmp_path, train={"steps": 4, "save_every": 2})
    train(replace_section(cfg, "train", steps=2))

    def full(*a, **k):
        raise RuntimeError("unexpected pos 704 vs 598")

    monkeypatch.setattr(ckpt_mod.dcp, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("u", "total used free")(10, 10, 0))
    with pytest.raises(OSError, match=r"saving step 4 failed: the disk holding .* is full \(0 bytes free\)\. The last "
                                      r"checkpoint, .*step_00000002, is intact"):
        train(cfg)
    assert CheckpointManager(tmp_path / "run" / "checkpoints").steps() == [2]


def test_eval_beyond_the_models_length_is_refused(tmp_path, capsys):
    from flexmore.cli import eval as eval_cli

    train(tiny_config(tmp_path / "base", train={"steps": 2}))
    base = tmp_path / "base" / "run"
    assert eval_cli.main(["--model", str(base), "--seq-len", "100000", "--out", str(tmp_path / "e")]) != 0
    assert "--seq-len 100000 is beyond the model's max_seq_len=256" in capsys.readouterr().err


def test_a_bad_sweep_shard_fails_before_any_work_naming_it(tmp_path, capsys):
    from flexmore.cli import sweep

    assert sweep.main(["--base", str(tmp_path), "--experts", str(tmp_path), "--shard", "3/3",
                       "--out", str(tmp_path / "s")]) == 2
    assert "--shard '3/3': allowed I/N" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_a_folder_another_writer_published_first_is_kept_not_replaced(tmp_path):
    """Two sweep shards extracting the same low-rank expert: the second writer's copy is dropped, the first stays."""
    from flexmore.atomic import atomic_dir

    out = tmp_path / "art"

    def write_late(tmp):
        (tmp / "who").write_text("second")
        atomic_dir(out, lambda t: (t / "who").write_text("first"))  # the other writer finishes meanwhile

    atomic_dir(out, write_late)
    assert (out / "who").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no temporary folder left behind
    with pytest.raises(FileExistsError):
        atomic_dir(out, lambda t: None)
