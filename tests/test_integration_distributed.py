"""DDP, FSDP2 and compile + DDP on converted models, with gloo on 127.0.0.1 (issue 4, points 1, 2 and 3).

All checks share one spawned 2-process group (see _dist_utils.py): the fixture runs every job once, and each
test compares the ranks' results with a single-process run on the concatenated batch. GroupNorm has no
batch statistics, so data-parallel training over 2 x 2 images equals single-process training on 4 images.
"""

from __future__ import annotations

import copy
import functools
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

import wsconvert

sys.path.insert(0, str(Path(__file__).parent))  # spawned workers import the job module by name

import _dist_jobs as jobs  # noqa: E402
from _dist_utils import ok, run_jobs  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("one_thread")]


WORLD = 2
DOC_RECIPES = jobs.DISTRIBUTED_RECIPES


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    return run_jobs(
        {
            "ddp": jobs.ddp_one_step,
            "fsdp2": jobs.fsdp2_train,
            "fsdp2_cache": jobs.fsdp2_eval_cache,
            "ddp_compile": jobs.ddp_compile,
            "ddp_compile_unsplit": functools.partial(jobs.ddp_compile, optimize_ddp=False),
            "ordering": jobs.wrapped_then_converted,
            "bcn_est_sync": functools.partial(jobs.bcn_ddp_step, estimate=0.1, sync=True),
            "bcn_plain": functools.partial(jobs.bcn_ddp_step, estimate=None, sync=False),
            **{f"doc_{name}": functools.partial(jobs.doc_recipe, name=name) for name in DOC_RECIPES},
        },
        tmp_path_factory.mktemp("dist"),
        world_size=WORLD,
    )


def _reference_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def test_ddp_gradients_equal_single_process_on_concatenated_batch(results) -> None:
    rank0, rank1 = ok(results["ddp"])
    assert rank0["grads"].keys() == rank1["grads"].keys()
    for name in rank0["grads"]:
        assert torch.equal(rank0["grads"][name], rank1["grads"][name]), f"ranks disagree on {name}"
    ((x, y),) = jobs.batches(1, WORLD, 32)
    expected = _reference_grads(jobs.resnet18_gn(), x, y)
    assert rank0["grads"].keys() == expected.keys()
    assert sum(name.endswith("parametrizations.weight.original") for name in expected) == 20
    for name, grad in expected.items():
        torch.testing.assert_close(rank0["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def _single_process_steps(reference: nn.Module, size: int) -> tuple[list, list, dict]:
    """The single-process reference of the FSDP2 jobs (``jobs._fsdp2_steps``): the same STEPS + 1 steps on whole
    batches: (data, losses, evals after the last reference step and after one more step)."""
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    data = jobs.batches(jobs.STEPS + 1, WORLD, size)
    losses, evals = [], {}
    for step, (x, y) in enumerate(data):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(reference(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        if step >= jobs.STEPS - 1:
            with torch.no_grad():
                evals[f"after_step{step + 1}"] = reference.eval()(data[0][0])
            reference.train()
    return data, losses, evals


def test_fsdp2_trains_like_single_process_and_its_state_dict_loads(results) -> None:
    rank0, rank1 = ok(results["fsdp2"])
    reference = jobs.resnet18_gn()
    initial = copy.deepcopy(reference)
    data, losses, evals = _single_process_steps(reference, 32)
    with torch.no_grad():
        evals["after_load"] = initial.eval()(data[0][0])

    for rank_result in (rank0, rank1):
        torch.testing.assert_close(rank_result["losses"], torch.stack(losses), atol=1e-5, rtol=1e-5)
    # eval after training steps and after loading a state dict: the WS eval cache must not serve a stale
    # standardized weight when FSDP2 re-gathers parameters into reused storage
    for rank, rank_result in enumerate((rank0, rank1)):
        for when, expected in evals.items():
            for how, got in rank_result["evals"][when].items():
                torch.testing.assert_close(
                    got, jobs.shard(expected, rank), atol=1e-5, rtol=1e-4, msg=f"rank {rank}, {when}, {how}"
                )

    state = rank0["state_dict"]
    assert rank1["state_dict"] is None
    fresh = wsconvert.convert_model(torchvision.models.resnet18(weights=None, num_classes=10), gn=32)
    fresh.load_state_dict(state, strict=True)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(state[name], value, atol=1e-5, rtol=1e-4, msg=name)
    x = data[0][0]
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), reference.eval()(x), atol=1e-5, rtol=1e-4)


def _check_compiled_ddp(rank0: dict[str, Any], rank1: dict[str, Any], split: bool = True) -> None:
    if split:
        assert rank0["optimize_ddp"], "the default DDPOptimizer path (graph split per bucket) is what is tested"
        assert rank0["buckets"] and max(rank0["buckets"]) >= 2, f"DDPOptimizer made buckets {rank0['buckets']}"
        assert rank0["graphs"] >= 2, "DDPOptimizer should have compiled one graph per bucket"
    model = jobs.wide_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, (x, y) in enumerate(jobs.batches(2, WORLD, 8)):
        expected = _reference_grads(model, x, y)
        for rank, rank_result in enumerate((rank0, rank1)):
            for name, grad in expected.items():
                torch.testing.assert_close(
                    rank_result["grads"][step][name], grad, atol=1e-4, rtol=1e-4, msg=f"rank {rank} step {step} {name}"
                )
        optimizer.step()


def test_compile_of_ddp_with_several_buckets_matches_eager(results) -> None:
    _check_compiled_ddp(*ok(results["ddp_compile"]))


@pytest.mark.slow
def test_compile_of_ddp_with_inductor_matches_eager(tmp_path: Path) -> None:
    """The same with the default inductor backend (about a minute of C++ code generation on 2 CPU cores)."""
    job = functools.partial(jobs.ddp_compile, backend="inductor")
    _check_compiled_ddp(
        *ok(run_jobs({"ddp_compile_inductor": job}, tmp_path, world_size=WORLD)["ddp_compile_inductor"])
    )


def test_compile_of_ddp_without_graph_splitting_matches_eager(results) -> None:
    """The documented fallback for PyTorch versions hit by #113415: torch._dynamo.config.optimize_ddp = False."""
    rank0, rank1 = ok(results["ddp_compile_unsplit"])
    assert not rank0["optimize_ddp"] and rank0["graphs"] == 1 and rank0["buckets"] == []
    _check_compiled_ddp(rank0, rank1, split=False)


def test_fsdp2_eval_cache_never_serves_stale_weights(results) -> None:
    for rank, result in enumerate(ok(results["fsdp2_cache"])):
        assert result["cache_bypassed"], f"rank {rank}: the WS eval cache is in use under FSDP2"
        assert torch.count_nonzero(result["stale"]) == 0, f"rank {rank}: stale outputs {result['stale']}"


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_converting_a_wrapped_model_is_refused(results, wrapper: str) -> None:
    messages = [r["messages"] for r in ok(results["ordering"])]
    for message in messages:
        assert "convert the bare model first, then wrap it" in message[wrapper]
    assert "DistributedDataParallel" in messages[0]["ddp"] and "(.module)" in messages[0]["ddp"]
    assert "FSDP2 fully_shard" in messages[0]["fsdp2"]


@pytest.mark.parametrize("name", DOC_RECIPES)
def test_distributed_recipe_of_the_docs_runs(results, name: str) -> None:
    rank0, rank1 = ok(results[f"doc_{name}"])
    for rank_result in (rank0, rank1):
        assert rank_result["finite"] and rank_result["grads"] > 0
    if name == "fsdp2":  # rank 0 loads the full state dict into a fresh converted model
        assert rank0["single_loaded"] and not rank1["single_loaded"]


def _bcn_single_process(estimate: float | None, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    model = jobs.bcn_cnn(estimate, sync=False)
    out = model(x)
    nn.functional.cross_entropy(out, y).backward()
    return {"out": out.detach(), "grads": jobs._grads(model), "buffers": dict(model.named_buffers())}


def test_bcn_estimated_sync_under_ddp_equals_single_process_on_the_global_batch(results) -> None:
    """EstBN replacing a SyncBatchNorm pools its batch moments over the ranks (gloo, CPU): every rank's running
    estimates, outputs and averaged gradients equal one process on the concatenated batch."""
    ranks = ok(results["bcn_est_sync"])
    ((x, y),) = jobs.batches(1, WORLD, 8)
    expected = _bcn_single_process(0.1, x, y)
    assert sum(name.endswith("estbn_moving_speed") for name in expected["buffers"]) == 2
    for rank, got in enumerate(ranks):
        torch.testing.assert_close(got["out"], jobs.shard(expected["out"], rank), atol=1e-5, rtol=1e-4)
        for name, value in expected["buffers"].items():
            torch.testing.assert_close(got["buffers"][name], value, atol=1e-6, rtol=1e-5, msg=f"rank {rank} {name}")
        # the loss is a per-rank mean, so DDP's average equals the gradient of the global mean
        for name, grad in expected["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=f"rank {rank} {name}")


def test_bcn_under_ddp_keeps_per_rank_batch_statistics_and_averages_gradients(results) -> None:
    """Plain BCN (inner BatchNorm2d, not synchronized): each rank normalizes with its own batch, as a single
    process on that rank's images does; DDP averages the two gradients."""
    ranks = ok(results["bcn_plain"])
    ((x, y),) = jobs.batches(1, WORLD, 8)
    per_rank = [_bcn_single_process(None, jobs.shard(x, r), jobs.shard(y, r)) for r in range(WORLD)]
    for rank, got in enumerate(ranks):
        torch.testing.assert_close(got["out"], per_rank[rank]["out"], atol=1e-5, rtol=1e-4)
        for name in per_rank[0]["grads"]:
            mean = (per_rank[0]["grads"][name] + per_rank[1]["grads"][name]) / 2
            torch.testing.assert_close(got["grads"][name], mean, atol=1e-5, rtol=1e-4, msg=f"rank {rank} {name}")


# --- preserve=True (issue 11) ------------------------------------------------------------------------------------
# A process group of their own, so that ``-k preserve`` runs only these jobs.


@pytest.fixture(scope="module")
def preserve_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    return run_jobs(
        {"ddp_preserve": jobs.ddp_preserve_step, "fsdp2_preserve": jobs.fsdp2_preserve_train},
        tmp_path_factory.mktemp("dist_preserve"),
        world_size=WORLD,
    )


def _check_evals(got: dict[str, torch.Tensor], expected: torch.Tensor, msg: str) -> None:
    for how, value in got.items():  # first, cached (second call), uncached
        torch.testing.assert_close(value, expected, atol=1e-5, rtol=1e-4, msg=f"{msg}, {how}")


def test_preserve_ddp_broadcasts_gain_shift_and_steps_like_single_process(preserve_results) -> None:
    """DDP broadcasts rank 0's gain/shift (buffers) at wrap time; one SGD step over 2 x 2 images then equals one
    process on the 4 images: gradients, updated weights (gain/shift unchanged), eval outputs."""
    rank0, rank1 = ok(preserve_results["ddp_preserve"])
    reference = jobs.preserve_cnn()
    gain_shift = jobs.gain_shift(reference)
    assert len(gain_shift) == 6  # conv1, conv2, up
    for key, value in gain_shift.items():
        torch.testing.assert_close(rank0["before"][key], value, rtol=0, atol=0, msg=key)
        assert not torch.allclose(rank1["before"][key], value), f"rank 1 must start with other {key}"
        for rank, got in enumerate((rank0, rank1)):
            torch.testing.assert_close(got["after_wrap"][key], value, rtol=0, atol=0, msg=f"rank {rank} {key}")

    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    ((x, y),) = jobs.batches(1, WORLD, 8)
    grads = _reference_grads(reference, x, y)
    optimizer.step()
    assert sum(name.endswith("parametrizations.weight.original") for name in grads) == 3
    with torch.no_grad():
        evaluated = reference.eval()(x)
    for rank, got in enumerate((rank0, rank1)):
        assert got["grads"].keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(got["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=f"rank {rank} {name}")
        state = reference.state_dict()
        assert list(got["state"]) == list(state)
        for key, value in state.items():
            torch.testing.assert_close(got["state"][key], value, atol=1e-5, rtol=1e-4, msg=f"rank {rank} {key}")
        _check_evals(got["evals"], jobs.shard(evaluated, rank), f"rank {rank}")


def test_preserve_fsdp2_trains_like_single_process_and_round_trips_gain_shift(preserve_results) -> None:
    rank0, rank1 = ok(preserve_results["fsdp2_preserve"])
    assert len(rank0["sharded"]) == len(list(jobs.preserve_cnn().parameters()))  # every parameter is a DTensor
    assert set(rank0["buffer_types"].values()) == {"Tensor"} and len(rank0["buffer_types"]) == 6  # gain/shift not
    reference = jobs.preserve_cnn()
    initial_gain_shift = jobs.gain_shift(reference)
    data, losses, evals = _single_process_steps(reference, 8)
    other = jobs.preserve_cnn(seed=1)
    with torch.no_grad():
        evals["after_load"] = other.eval()(data[0][0])
        # a load that kept the old gain/shift (or the old W) would give other outputs: the check can fail
        assert not torch.allclose(evals["after_load"], reference.eval()(data[0][0]), atol=1e-3)

    for rank, got in enumerate((rank0, rank1)):
        torch.testing.assert_close(got["losses"], torch.stack(losses), atol=1e-5, rtol=1e-5, msg=f"rank {rank}")
        for when, expected in evals.items():
            _check_evals(got["evals"][when], jobs.shard(expected, rank), f"rank {rank}, {when}")
        for key, value in jobs.gain_shift(other).items():  # set_model_state_dict loaded them
            torch.testing.assert_close(got["gain_shift"][key], value, rtol=0, atol=0, msg=f"rank {rank} {key}")

    state = rank0["state_dict"]
    assert rank1["state_dict"] is None
    for key, value in initial_gain_shift.items():  # constants: training did not move them
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(state[name], value, atol=1e-5, rtol=1e-4, msg=name)
    fresh = jobs.preserve_cnn(seed=2)
    fresh.load_state_dict(state, strict=True)
    x = data[0][0]
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), reference.eval()(x), atol=1e-5, rtol=1e-4)
