"""seekdeep.data.synthetic: the copy-recall generator's layout, seeding and errors."""

from __future__ import annotations

import pytest
import torch

from seekdeep.data.synthetic import IGNORE_INDEX, CopyRecall
from seekdeep.errors import ConfigError

TASK = CopyRecall(seq_len=64, span=20, num_tokens=30, num_filler=5)


def test_same_seed_same_batch_other_seed_other_batch():
    first, again = TASK.sample(4, seed=3), TASK.sample(4, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], TASK.sample(4, seed=4)[0])


def test_copy_repeats_the_source_and_only_the_copy_is_labelled():
    ids, labels, source_start, copy_start = TASK.sample(64, seed=0)
    assert ids.shape == labels.shape == (64, TASK.seq_len)
    assert int(ids.min()) >= 0 and int(ids.max()) < TASK.vocab_size
    for row, row_labels, s, c in zip(ids, labels, source_start.tolist(), copy_start.tolist()):
        assert s >= 0 and c >= s + TASK.span and c + TASK.span <= TASK.seq_len
        source = row[s:s + TASK.span]
        assert source.unique().numel() == TASK.span and bool((source < TASK.num_tokens).all())
        assert torch.equal(row[c:c + TASK.span], source)
        # Everything else is filler, so each copy token's successor has exactly one source.
        outside = torch.ones(TASK.seq_len, dtype=torch.bool)
        outside[s:s + TASK.span] = outside[c:c + TASK.span] = False
        assert bool((row[outside] >= TASK.num_tokens).all())
        labelled = (row_labels != IGNORE_INDEX).nonzero(as_tuple=True)[0]
        assert labelled.tolist() == list(range(c + 1, c + TASK.span))  # the copy's first token is a guess
        assert torch.equal(row_labels[labelled], row[labelled])
        # The answer for slot t of the copy sits at the same place in the source, c - s slots back.
        for t in labelled.tolist():
            key = int(row[t - 1])
            (where,) = (row[:c] == key).nonzero(as_tuple=True)
            assert where.tolist() == [t - 1 - (c - s)] and int(row[where + 1]) == int(row[t])


def test_recall_distance_varies_over_its_whole_range():
    _, _, source_start, copy_start = TASK.sample(512, seed=1)
    offsets = copy_start - source_start
    assert int(offsets.min()) == TASK.span and int(offsets.max()) == TASK.seq_len - TASK.span
    assert int(source_start.min()) == 0 and int((copy_start + TASK.span).max()) == TASK.seq_len


@pytest.mark.parametrize("kwargs,field", [
    (dict(span=1), "span"),
    (dict(span=40, num_tokens=30), "span"),
    (dict(seq_len=30, span=20), "seq_len"),
    (dict(num_filler=0), "num_filler"),
    (dict(num_tokens=True), "num_tokens"),
])
def test_bad_settings_raise_config_error_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        CopyRecall(**{**dict(seq_len=64, span=20, num_tokens=30), **kwargs})
