"""CodeUsage on histograms whose figures are known by hand."""

from __future__ import annotations

import math

import pytest
import torch

from vqtok import CodeUsage


def test_uniform_histogram_has_full_utilization_and_perplexity_k():
    usage = CodeUsage(8).update(torch.arange(8).repeat(5))
    assert usage.tokens == 40
    assert usage.utilization() == 1.0
    assert usage.perplexity() == pytest.approx(8.0, rel=1e-9)
    assert usage.dead_codes().tolist() == []


def test_known_skewed_histogram():
    # codes 0, 1 used 3 and 1 times; codes 2..9 never: utilization 2/10, perplexity exp(H(3/4, 1/4))
    usage = CodeUsage(10).update(torch.tensor([[0, 0], [0, 1]]))
    assert usage.utilization() == pytest.approx(0.2)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert usage.perplexity() == pytest.approx(math.exp(entropy), rel=1e-9)
    assert usage.dead_codes().tolist() == list(range(2, 10))
    summary = usage.summary()
    assert summary["tokens"] == 4 and summary["tokens_per_code"] == pytest.approx(0.4)
    assert summary["codebook_size"] == 10


def test_counts_accumulate_over_every_update_not_a_window():
    usage = CodeUsage(100_000)
    for start in range(0, 100_000, 10_000):  # ten batches, each touching new codes
        usage.update(torch.arange(start, start + 10_000))
    assert usage.utilization() == 1.0 and usage.tokens == 100_000


def test_empty_histogram_reports_zero():
    usage = CodeUsage(4)
    assert usage.tokens == 0 and usage.utilization() == 0.0 and usage.perplexity() == 0.0


def test_state_dict_round_trip():
    usage = CodeUsage(16).update(torch.randint(0, 16, (1000,), generator=torch.Generator().manual_seed(0)))
    other = CodeUsage(16)
    other.load_state_dict(usage.state_dict())
    assert torch.equal(other.counts, usage.counts) and other.perplexity() == usage.perplexity()
    with pytest.raises(ValueError, match="16 codes"):
        CodeUsage(17).load_state_dict(usage.state_dict())


def test_rejects_out_of_range_and_float_indices():
    usage = CodeUsage(4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        usage.update(torch.tensor([0, 4]))
    with pytest.raises(TypeError):
        usage.update(torch.tensor([0.0, 1.0]))


def test_all_reduce_without_distributed_is_a_copy():
    usage = CodeUsage(4).update(torch.tensor([1, 1, 2]))
    total = usage.all_reduce()
    assert torch.equal(total.counts, usage.counts) and total is not usage
    total.update(torch.tensor([3]))
    assert usage.tokens == 3  # the original is untouched
