"""Exact resume: the train loader (stock batches, any number of workers, start at any batch),
each rank's own RNG state beside each checkpoint, and a 2-rank job SIGKILLed and resumed."""

import inspect
import json
import os
import random

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException
from detectron2.data import build_detection_train_loader
from detectron2.data.common import ToIterableDataset
from detectron2.data.samplers import TrainingSampler

import resume_worker
from agvm.detectron2.checkpoint import SafeCheckpointer
from agvm.runner import free_port


# ------------------------------------------------------------------------------ the loader
def _dicts(n=14):
    """Portrait and landscape entries in an irregular order (no images: the mapper records)."""
    rng = np.random.RandomState(3)
    out = []
    for i in range(n):
        w, h = (48, 64) if rng.rand() < 0.4 else (64, 48)
        out.append({"image_id": i, "width": w, "height": h, "file_name": f"{i}.png"})
    assert {d["width"] > d["height"] for d in out} == {True, False}
    return out


def record(d):
    """A mapper that records its image and one draw from each global RNG (the augmentation
    randomness a detectron2 mapper uses)."""
    return {"image_id": d["image_id"], "width": d["width"], "height": d["height"],
            "draws": (float(np.random.rand()), random.random(), float(torch.rand(())))}


def fails_on_3(d):
    return None if d["image_id"] == 3 else record(d)


def _sampler(seed=7, rank=0, world=1, n=14):
    s = TrainingSampler(n, seed=seed)
    s._rank, s._world_size = rank, world  # one rank of a `world`-rank job, in this process
    return s


def _mine(grouping, workers, start=0, mapper=record, **kw):
    from agvm.detectron2.loader import ResumableTrainLoader

    loader = ResumableTrainLoader(_dicts(), mapper, _sampler(**kw), 3, aspect_ratio_grouping=grouping,
                                  num_workers=workers)
    loader.start_batch = start
    return loader


def _take(loader, k):
    it = iter(loader)
    return [next(it) for _ in range(k)]


def _ids(batches):
    return [[d["image_id"] for d in b] for b in batches]


@pytest.mark.parametrize("grouping, stock_workers", [(True, 0), (True, 2), (False, 0)])
@pytest.mark.parametrize("rank", [0, 1])
def test_same_batches_as_detectron2(grouping, stock_workers, rank):
    """The images and batches of detectron2's stock train loader (TrainingSampler, same seed),
    on rank 0 and on rank 1 of a 2-rank job; with grouping whatever stock's worker count (stock
    batches each worker's strided share without grouping: the 0-worker batches are the ones kept)."""
    if stock_workers and "shard_chunk_size" in inspect.signature(ToIterableDataset).parameters:
        pytest.skip("detectron2 main hands each worker batch-sized chunks of the sampler, so its stock image order "
                    "depends on NUM_WORKERS; ours is the 0-worker order (the stock_workers=0 cases compare it)")
    stock = build_detection_train_loader(
        dataset=_dicts(), mapper=record, sampler=_sampler(rank=rank, world=2), total_batch_size=3,
        aspect_ratio_grouping=grouping, num_workers=stock_workers,
    )
    expected = _ids(_take(stock, 12))
    got = _ids(_take(_mine(grouping, 0, rank=rank, world=2), 12))
    assert got == expected
    if grouping:  # mixed orientations: grouping changed the order (else this test shows nothing)
        assert got != _ids(_take(_mine(False, 0, rank=rank, world=2), 12))


@pytest.mark.parametrize("grouping", [True, False])
def test_workers_do_not_change_batches_or_augmentations(grouping):
    zero = _take(_mine(grouping, 0), 10)
    two = _take(_mine(grouping, 2), 10)
    assert zero == two  # ids and every draw of every item
    assert len({d["draws"] for b in zero for d in b}) == 30  # distinct draws per item


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("k", [1, 4, 7])
def test_started_at_batch_k_continues_the_uninterrupted_stream(workers, k):
    full = _take(_mine(True, 2), 12)
    assert _take(_mine(True, workers, start=k), 12 - k) == full[k:]


def test_main_process_rng_untouched_and_rank_streams_differ():
    """With 0 workers, creating an iterator and mapping batches leaves the global RNGs as they
    were (the model's stream); rank 1's augmentation draws are not rank 0's."""
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    batches = _take(_mine(True, 0), 4)
    after = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
    other = _take(_mine(True, 0, rank=1, world=2), 4)
    assert {d["draws"] for b in batches for d in b}.isdisjoint({d["draws"] for b in other for d in b})


def test_mapper_returning_none_is_replaced_deterministically():
    """Index 3 fails: replaced by an image of the same orientation, the same with 0 and 2 workers."""
    dicts = _dicts()
    zero = _take(_mine(True, 0, mapper=fails_on_3), 10)
    assert zero == _take(_mine(True, 2, mapper=fails_on_3), 10)
    ids = [d["image_id"] for b in zero for d in b]
    assert 3 not in ids and 3 in [i for b in _ids(_take(_mine(True, 0), 10)) for i in b]
    for b in zero:
        assert len({d["width"] > d["height"] for d in b}) == 1
    assert all(dicts[i]["image_id"] == i for i in ids)


def test_loader_seed_round_trips():
    a = _mine(True, 0, seed=11)
    b = _mine(True, 0, seed=99)
    b.load_state_dict(a.state_dict())
    assert _take(a, 5) == _take(b, 5)


# ------------------------------------------------------------------------------ per-rank RNG files
def test_rank_rng_file_of_the_checkpoint_actually_loaded(tmp_path, monkeypatch):
    """Every save writes this rank's RNG state beside the checkpoint; resume restores the file
    of the checkpoint it loads (an older one after a fallback); a rank without a file warns and
    keeps its own stream (never rank 0's); files of deleted checkpoints are removed."""
    from agvm.detectron2.checkpoint import rank_state_file
    from agvm.detectron2.resume import RankRNG

    model = torch.nn.Linear(2, 2)
    ckpt = SafeCheckpointer(model, str(tmp_path), save_to_disk=True)
    ckpt.per_rank = RankRNG()
    torch.manual_seed(1)
    state1 = torch.get_rng_state()
    ckpt.save("model_0000001")
    torch.rand(10)
    ckpt.save("model_0000002")
    assert os.path.isfile(rank_state_file(str(tmp_path / "model_0000002.pth"), 0))
    (tmp_path / "model_0000002.pth").write_bytes(b"truncated")
    torch.rand(10)
    fresh = SafeCheckpointer(model, str(tmp_path), save_to_disk=True)
    fresh.per_rank = RankRNG()
    with pytest.warns(RuntimeWarning, match="resumed from .*model_0000001"):
        fresh.resume_or_load("", resume=True)
    assert fresh.loaded_checkpoint.endswith("model_0000001.pth")
    assert torch.equal(torch.get_rng_state(), state1)

    # rank 1 of a job whose checkpoint holds rank 0's file only
    from detectron2.utils import comm

    monkeypatch.setattr(comm, "get_rank", lambda: 1)
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    torch.manual_seed(2)
    mine = torch.get_rng_state()
    with pytest.warns(RuntimeWarning, match="rank 1: no saved RNG state for this rank.*not rank 0's"):
        fresh.resume_or_load("", resume=True)
    assert torch.equal(torch.get_rng_state(), mine)

    # rank 1 saves: its file appears; its files of checkpoints deleted since are removed
    stale = rank_state_file(str(tmp_path / "model_0000000.pth"), 1)
    open(stale, "wb").close()
    ckpt.save("model_0000003")
    assert os.path.isfile(rank_state_file(str(tmp_path / "model_0000003.pth"), 1)) and not os.path.exists(stale)
    assert not any(f.endswith(".pth") and "rank" in f for f in os.listdir(tmp_path))


# ------------------------------------------------------------------------------ 2 ranks, killed, resumed


def _spawn(out_dir, phase, kill_at=-1):
    mp.start_processes(resume_worker.run, args=(2, free_port(), str(out_dir), phase, kill_at), nprocs=2,
                       start_method="spawn")


def _records(out_dir, phase, rank):
    with open(out_dir / f"{phase}_{rank}.jsonl") as f:
        return {r["iter"]: r for r in map(json.loads, f)}


@pytest.mark.ddp
def test_two_ranks_killed_and_resumed_continue_exactly(tmp_path):
    """2 gloo ranks, 2 data workers each, aspect-ratio grouping over portrait and landscape
    images, random resize and flip, AGVM (iterations 2, 4, 6); checkpoints after iterations 1,
    3, 5; every rank SIGKILLed after iteration 4, then --resume (from iteration 4): on every rank
    each iteration from 4 on reads the same images in the same order with the same
    augmentations, gives bit-identical local and logged losses and μ, and starts from the same
    RNG state as in the uninterrupted run; rank 1's RNG state is its own (not rank 0's).

    The first iteration after the resume is an AGVM one on purpose: the resumed process runs it
    with DDP's initial bucket layout, the uninterrupted one with the layout DDP rebuilt after its
    first iteration, and the AGVM hook's sums must not depend on the layout (they did in the last
    bits once: μ ~3e-9 relative, then ~1e-7 in the losses)."""
    _spawn(tmp_path, "full")
    # both ranks kill themselves; the launcher may also see a rank fail on its partner's death
    with pytest.raises(ProcessException):
        _spawn(tmp_path, "first", kill_at=4)
    assert (tmp_path / "parted" / "last_checkpoint").read_text() == "model_0000003.pth"
    _spawn(tmp_path, "second")
    full = [_records(tmp_path, "full", r) for r in (0, 1)]
    first = [_records(tmp_path, "first", r) for r in (0, 1)]
    second = [_records(tmp_path, "second", r) for r in (0, 1)]
    assert sorted(second[0]) == sorted(second[1]) == [4, 5, 6]
    for r in (0, 1):
        assert [first[r][i] for i in range(5)] == [full[r][i] for i in range(5)]  # the same run until the kill
        for i in (4, 5, 6):
            assert second[r][i]["forwards"][0]["files"] == full[r][i]["forwards"][0]["files"], (r, i)
            assert second[r][i] == full[r][i], (r, i)  # augmentations, losses, logged losses, μ, RNG
    # the first iteration after the resume updated μ (an AGVM iteration), and so did iteration 6
    assert second[0][4]["mu"]["box_head"] != full[0][3]["mu"]["box_head"] != 1.0
    assert second[0][6]["mu"]["box_head"] != second[0][5]["mu"]["box_head"]
    # the grouping mattered: portrait and landscape batches on each rank
    for r in (0, 1):
        shapes = {tuple(s[1:]) for i in full[r] for s in full[r][i]["forwards"][0]["sizes"]}
        assert len({h > w for h, w in shapes}) == 2, shapes
    # each rank its own stream: different from the other's, and equal to its own uninterrupted one
    assert second[0][4]["rng"] != second[1][4]["rng"]
    assert second[1][4]["rng"] == full[1][4]["rng"]
