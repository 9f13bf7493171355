"""Hydra configs: every group option and experiment composes into validated dataclasses; bad input fails early."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ValidationError

import flexmore.cli.train as cli
from flexmore.config import Config
from flexmore.model.presets import conf_dir

CONF = conf_dir()
GROUPS = {g: sorted(p.stem for p in (CONF / g).glob("*.yaml")) for g in
          ("model", "data", "optim", "train", "logging", "parallel", "experiment")}


def composed(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return cli.to_config(compose("config", overrides=list(overrides)))


def test_default_is_the_embedded_tiny_run():
    cfg = composed()
    assert isinstance(cfg, Config)
    assert (cfg.model.name, cfg.data.source, cfg.data.domains, cfg.logging.mode) == ("tiny", "embedded", ["public"], "offline")


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts
                                          if (g, o) not in (("data", "shards"), ("experiment", "expert"))])
def test_every_option_composes(group, option):
    cfg = composed(f"{group}={option}")
    if group == "model":
        assert cfg.model.name == option
    if group == "experiment":
        assert cfg.run_name == option


def test_shards_option_needs_paths():
    with pytest.raises(ValueError, match="data.source=shards needs data.paths"):
        composed("data=shards")
    cfg = composed("data=shards", "data.paths=[/some/shards]", "+data.val_paths.web=/some/val")  # as in the README
    assert cfg.data.paths == ["/some/shards"] and cfg.data.val_paths == {"web": "/some/val"}


def test_unknown_group_option_names_the_choices():
    with pytest.raises(MissingConfigException, match="Could not find 'model/nope'") as err:
        composed("model=nope")
    assert "tiny" in str(err.value) and "small" in str(err.value)


def test_unknown_key_and_wrong_type_fail():
    with pytest.raises(ConfigCompositionException, match="d_modle"):
        composed("model.d_modle=3")
    with pytest.raises(ConfigCompositionException) as err:
        composed("train.steps=many")
    assert isinstance(err.value.__cause__, ValidationError)


def test_semantic_checks_run_at_start_up():
    with pytest.raises(ValueError, match="top_k=3 is larger than num_experts=2"):
        composed("model.num_experts=2", "model.top_k=3")
    allowed = "token, prefix, sequence, likelihood, posterior"
    with pytest.raises(ValueError, match=f"route_context='document'; allowed: {allowed}"):
        composed("model.route_context=document")
    assert composed("model.route_context=sequence").model.route_context == "sequence"
    with pytest.raises(ValueError, match="train.seq_len=4096 is larger than the model's max_seq_len=256"):
        composed("train.seq_len=4096")
    with pytest.raises(ValueError, match="data domain 'poetry' is not an embedded domain"):
        composed("data.domains=[poetry]")


def run_cli(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flexmore.cli.train", *args], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300)


def test_cli_runs_in_a_rank_shared_run_dir_and_rejects_bad_input_before_work(tmp_path):
    """torchrun gives every rank the same TORCHELASTIC_RUN_ID: the run dir must be built from it, not the clock."""
    done = run_cli(tmp_path, "experiment=smoke", "train.steps=4", env={"TORCHELASTIC_RUN_ID": "job42"})
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "outputs" / "smoke" / "job42"
    assert (run_dir / "checkpoints" / "step_00000004" / "meta.json").is_file()
    assert "train loss" in done.stdout
    bad = run_cli(tmp_path, "experiment=smoke", "model.num_experts=2", "model.top_k=5",
                  env={"TORCHELASTIC_RUN_ID": "job43"})
    assert bad.returncode != 0 and "top_k=5 is larger than num_experts=2" in bad.stderr
    assert not (tmp_path / "outputs" / "smoke" / "job43" / "checkpoints").exists()


def test_expert_experiment_requires_a_base():
    with pytest.raises(ValueError, match="expert.base is required for an expert run"):
        composed("experiment=expert")
    cfg = composed("experiment=expert", "expert.base=/some/base", "expert.kind=lowrank", "expert.ranks=[8,16,8]")
    assert cfg.expert.ranks == [8, 16, 8] and cfg.data.domains == ["math"]


def test_values_left_missing_are_named():
    with pytest.raises(ValueError, match="required config values are not set: data.cache_dir"):
        composed("data.cache_dir=???")


@pytest.mark.parametrize("override, match", [
    ("parallel.backend=mpi", "parallel.backend='mpi'; allowed: auto, nccl, gloo"),
    ("parallel.mixed_precision=fp8", "parallel.mixed_precision='fp8'; allowed: auto, bf16, off"),
    ("parallel.replicate_backend=tcp", "parallel.replicate_backend='tcp'; allowed: auto, gloo"),
    ("parallel.shard=0", r"parallel.shard=0 must be >= 1 or null"),
])
def test_bad_parallel_settings_fail_at_start_up(override, match):
    with pytest.raises(ValueError, match=match):
        composed(override)


@pytest.mark.parametrize("override, match", [
    ("train.nonfinite=ignore", "train.nonfinite='ignore'; allowed: stop, skip"),
    ("train.max_skips=0", "train.max_skips=0 must be >= 1"),
    ("parallel.timeout_s=0", "parallel.timeout_s=0.0 must be a finite number of seconds > 0"),
])
def test_fault_settings_fail_at_start_up(override, match):
    with pytest.raises(ValueError, match=match):
        composed(override)


@pytest.mark.parametrize("override, match", [
    ("optim.demo.topk=5000", r"optim.demo.topk=5000 must be in \[1, chunk\*chunk=4096\]"),
    ("optim.demo.dct_forward=tf16", "optim.demo.dct_forward='tf16'; allowed: fp32, tf32, bf16"),
    ("optim.demo.base_step=sgd",
     "optim.demo.base_step='sgd'; allowed: direct, adam, lion, orthogonal, coefficient_sign"),
    ("optim.adamw.betas=[0.9,1.5]", r"optim.adamw.betas=\[0.9, 1.5\]: two values in \[0, 1\)"),
    ("optim.weight_decay=-1", "optim.weight_decay=-1.0 must be >= 0"),
    ("optim.edge_lr_scale=0", "optim.edge_lr_scale=0.0 must be a finite number > 0"),
    ("optim.demo.adam_betas=[0.9,1.0]", r"optim.demo.adam_betas=\[0.9, 1.0\]: two values in \[0, 1\)"),
    ("optim.demo.adam_eps=0", "optim.demo.adam_eps=0.0 must be > 0"),
    ("optim.demo.nesterov=-0.5", "optim.demo.nesterov=-0.5 must be a finite number >= 0"),
    ("optim.demo.tensor_scale=rms", "optim.demo.tensor_scale='rms'; allowed: none, adam_rms"),
    ("optim.demo.precondition=sgd", "optim.demo.precondition='sgd'; allowed: none, adam"),
    ("optim.demo.orthogonal_scope=row", "optim.demo.orthogonal_scope='row'; allowed: matrix, chunk"),
    ("optim.demo.orthogonal_precision=fp16", "optim.demo.orthogonal_precision='fp16'; allowed: fp32, bf16"),
])
def test_each_optimizers_settings_are_checked_under_their_own_key(override, match):
    with pytest.raises(ValueError, match=match):
        composed("optim=flexdemo", override)


def test_demo_and_flexdemo_share_one_set_of_settings():
    """optim=demo is flexdemo.yaml with another sync strategy; an override reaches both the same way."""
    import dataclasses

    demo, flex = composed("optim=demo", "optim.demo.topk=8"), composed("optim=flexdemo", "optim.demo.topk=8")
    assert demo.optim.name == "demo" and flex.optim.name == "flexdemo"
    assert dataclasses.replace(demo.optim, name="flexdemo") == flex.optim and demo.optim.demo_config().topk == 8


def test_the_parity_benchmarks_default_variant_is_the_frameworks_default():
    """bench_parity's "flexdemo" runs what `optim=flexdemo` composes (the coefficient sign, weight decay 0.1), and
    "flexdemo-direct" DeMo's step without weight decay, so the table's "default" is the one users get."""
    import dataclasses
    import sys

    sys.path.insert(0, str(CONF.parent / "benchmarks"))
    import bench_parity

    optim = composed("optim=flexdemo").optim
    assert optim.demo.base_step == "coefficient_sign" and optim.weight_decay == 0.1
    assert bench_parity.WEIGHT_DECAY == optim.weight_decay == composed("optim=adamw").optim.weight_decay
    for name, step, wd in (("flexdemo", "coefficient_sign", 0.1), ("flexdemo-direct", "direct", 0.0),
                           ("flexdemo-coefsign-wd0.1", "coefficient_sign", 0.1)):
        variant = dict(bench_parity.VARIANTS[name])
        extra = {k: variant.pop(k) for k in bench_parity.OPTIM_KEYS if k in variant}
        assert dataclasses.replace(optim.demo, **variant).base_step == step
        assert extra.get("weight_decay", bench_parity.WEIGHT_DECAY) == wd
    assert dataclasses.replace(optim.demo, **dict(bench_parity.VARIANTS["flexdemo"])) == optim.demo
