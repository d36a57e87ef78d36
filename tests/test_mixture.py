"""Mixtures by sampling probability, applied after packing (pipelines/data/loader.py)."""

import numpy as np
import pytest
import torch

from pipelines.data.loader import BatchLoader, MixtureLoader, make_loader, open_split
from pipelines.data.shards import ShardWriter, write_manifest

SEQ = 8


def _mixture_dir(tmp_path, sizes: list[int], weights: list[float]):
    """A pretraining split whose source i holds `sizes[i]` tokens, all equal to 1000 + i."""
    writer_shards = []
    for i, size in enumerate(sizes):
        writer = ShardWriter(tmp_path, f"train_s{i}", np.uint16, 64)
        writer.write(np.full(size, 1000 + i, dtype=np.uint16))
        writer_shards += [{**shard, "source": i} for shard in writer.close()]
    write_manifest(tmp_path, {"kind": "pretrain", "dtype": "uint16", "eot_id": 50256,
                              "sources": [{"type": "text", "path": f"corpus{i}.txt", "weight": w} for i, w in enumerate(weights)],
                              "splits": {"train": {"tokens": sum(sizes), "shards": writer_shards},
                                         "val": {"tokens": 0, "shards": []}}})
    return tmp_path


def _loader(directory, micro=4, dp_rank=0, dp_size=1, seed=3):
    windows = open_split(directory, "train", seq_len=SEQ)
    return make_loader(directory, windows, micro, dp_rank=dp_rank, dp_size=dp_size, seed=seed)


def _sources(batch) -> list[int]:
    x, _ = batch
    return [int(row[0]) - 1000 for row in x]


def test_weights_set_the_share_of_windows_each_source_gives(tmp_path):
    """Source sizes 800 / 400 tokens with weights 1 / 3: target shares 800 : 1200 = 0.4 / 0.6
    (a weight multiplies a source's natural share); realised over 500 steps within 0.03."""
    loader = _loader(_mixture_dir(tmp_path, [800, 400], [1.0, 3.0]))
    assert isinstance(loader, MixtureLoader)
    assert loader.target == pytest.approx([0.4, 0.6], abs=0.01)
    counts = np.zeros(2)
    for _ in range(500):
        for source in _sources(next(loader)):
            counts[source] += 1
    assert counts / counts.sum() == pytest.approx([0.4, 0.6], abs=0.03)
    fractions = loader.fractions()
    assert list(fractions) == ["0_corpus0.txt", "1_corpus1.txt"]
    assert list(fractions.values()) == pytest.approx(list(counts / counts.sum()))


def test_a_mixture_resumes_exactly_and_splits_across_ranks(tmp_path):
    directory = _mixture_dir(tmp_path, [800, 400, 256], [1.0, 3.0, 0.5])
    straight = _loader(directory)
    expected = [next(straight)[0] for _ in range(30)]
    first = _loader(directory)
    for _ in range(12):
        next(first)
    resumed = _loader(directory)
    resumed.load_state_dict(first.state_dict())
    for want in expected[12:]:
        assert torch.equal(next(resumed)[0], want)
    # two data-parallel ranks of micro-batch 2 see, together, what one rank of 4 sees
    ranks = [_loader(directory, micro=2, dp_rank=r, dp_size=2) for r in range(2)]
    for want in expected[:10]:
        assert torch.equal(torch.cat([next(r)[0] for r in ranks]), want)


def test_equal_weights_keep_one_stream_in_natural_proportions(tmp_path):
    directory = _mixture_dir(tmp_path, [800, 400], [2.0, 2.0])
    assert isinstance(_loader(directory), BatchLoader)


def test_a_source_too_small_for_a_window_is_named(tmp_path):
    from model.errors import RelayError

    directory = _mixture_dir(tmp_path, [800, 4], [1.0, 2.0])
    with pytest.raises(RelayError, match="data source 1_corpus1.txt: fewer tokens than one window"):
        _loader(directory)


def test_prepared_sources_with_weights_train_as_a_mixture(tmp_path, shared_data, shakespeare):
    """Real preparation of two text sources (tagged shards), weights 1 and 3: the training
    loader is a mixture whose targets follow weight x windows, named after the files."""
    import yaml

    from jobs.plan import data_plan
    from jobs.spec import load_job
    from pipelines.data.prepare import prepare_data

    (tmp_path / "a.txt").write_text(shakespeare[:60_000])
    (tmp_path / "b.txt").write_text(shakespeare[100_000:130_000])
    job = {"name": "mix", "model": {"preset": "tiny", "block_size": 64}, "tokenizer": {"encoding": "gpt2"},
           "data": {"pretrain": {"val_fraction": 0.0, "sources": [{"type": "text", "path": "a.txt"},
                                                                 {"type": "text", "path": "b.txt", "weight": 3.0}]}}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    loaded = load_job(tmp_path / "job.yaml")
    prepare_data(data_plan(loaded), loaded.run_dir())
    directory = loaded.run_dir() / "data" / "pretrain"
    windows = open_split(directory, "train", seq_len=64)
    loader = make_loader(directory, windows, 4, seed=1)
    assert isinstance(loader, MixtureLoader) and loader.names == ["0_a.txt", "1_b.txt"]
    sizes = [w.num_windows for w in (s.windows for s in loader.streams)]
    assert loader.target == pytest.approx([sizes[0] / (sizes[0] + 3 * sizes[1]), 3 * sizes[1] / (sizes[0] + 3 * sizes[1])])
    assert sum(sizes) <= windows.num_windows + 2  # the same windows, split by source
