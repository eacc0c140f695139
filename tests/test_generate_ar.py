"""The class-conditional GPT (vqtok.generate.ar) and its sampler (vqtok.generate.sample)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vqtok.generate import (
    GPT,
    PRESETS,
    GPTConfig,
    balanced_labels,
    cfg_logits,
    cfg_scale_at,
    count_parameters,
    get_preset,
    sample,
    top_k_top_p_filter,
)
from vqtok.generate.ar import apply_rope, rope_2d_table
from vqtok.generate.config import GenTrainConfig

VARIANTS = {
    "rope2d": {},
    "learned": {"positions": "learned"},
    "adaln": {"adaln": True},
}


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is fastest on a shared machine, and keeps timings steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_gpt(seed: int = 0, **overrides) -> GPT:
    """A random GPT with a non-zero head (so its distributions are not uniform), in eval mode."""
    values = dict(vocab_size=32, num_classes=3, grid=(3, 4), dim=32, depth=2, heads=2, zero_init_head=False)
    values.update(overrides)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**values)).eval()
    if values.get("adaln"):  # IBQ's gates start near zero: make the blocks matter
        with torch.no_grad():
            for block in model.blocks:
                block.adaln[1].weight.normal_(std=0.3)
    return model


def random_batch(model: GPT, batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, model.seq_len), generator=g)
    labels = torch.randint(0, model.config.num_classes, (batch,), generator=g)
    return ids, labels


# ---------------------------------------------------------------------------------------------------------------
# The model.


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_steps_equal_full_forward_hidden_states(variant):
    model = small_gpt(**VARIANTS[variant])
    ids, labels = random_batch(model, 5)
    with torch.no_grad():
        full = model(ids, labels)  # (B, T, dim)
        cache = model.init_cache(5)
        steps = [model.forward_step(labels, 0, cache)]
        steps += [model.forward_step(ids[:, t - 1], t, cache) for t in range(1, model.seq_len)]
    assert full.shape == (5, model.seq_len, model.config.dim)
    for t, hidden in enumerate(steps):
        torch.testing.assert_close(hidden, full[:, t], atol=1e-5, rtol=1e-5, msg=f"position {t}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_hidden_state_depends_only_on_class_and_earlier_ids(variant):
    model = small_gpt(**VARIANTS[variant])
    ids, labels = random_batch(model, 4)
    t = 5
    perturbed = ids.clone()
    perturbed[:, t:] = (ids[:, t:] + 1 + torch.arange(model.seq_len - t)) % model.config.vocab_size
    with torch.no_grad():
        before, after = model(ids, labels), model(perturbed, labels)
    torch.testing.assert_close(after[:, :t + 1], before[:, :t + 1])  # hidden[:, t] sees ids[:, :t] only
    assert (after[:, t + 1:] - before[:, t + 1:]).abs().amax(dim=-1).min() > 1e-4  # later ones do see ids[:, t]
    with torch.no_grad():  # and every position sees the class
        other = model(ids, (labels + 1) % model.config.num_classes)
    assert (other - before).abs().amax(dim=-1).min() > 1e-4


def test_adaln_and_learned_positions_change_the_network():
    plain, learned, adaln = (small_gpt(**VARIANTS[v]) for v in ("rope2d", "learned", "adaln"))
    assert "pos_emb" in dict(learned.named_parameters()) and "pos_emb" not in dict(plain.named_parameters())
    assert any("adaln" in name for name, _ in adaln.named_parameters())
    assert not any("adaln" in name for name, _ in plain.named_parameters())
    ids, labels = random_batch(plain, 3)
    outs = {}
    for name, model in (("plain", plain), ("learned", learned), ("adaln", adaln)):
        model.train()
        model.loss(ids, labels).backward()
        outs[name] = model.eval()(ids, labels).detach()
        assert torch.isfinite(outs[name]).all()
    assert learned.pos_emb.grad.abs().sum() > 0
    assert all(block.adaln[1].weight.grad.abs().sum() > 0 for block in adaln.blocks)
    assert adaln.norm.adaln[1].weight.grad.abs().sum() > 0
    # learned positions without rotation: the same weights as plain give a different function
    torch.manual_seed(0)
    no_rope = GPT(GPTConfig(**{**plain.config.to_dict(), "positions": "learned"})).eval()
    state = {**plain.state_dict(), "pos_emb": torch.zeros_like(no_rope.pos_emb)}
    no_rope.load_state_dict(state)
    assert (no_rope(ids, labels) - outs["plain"]).abs().max() > 1e-3
    # IBQ's init: gates ~1e-3 of the rest, so a fresh AdaLN block is close to the identity
    fresh = GPT(GPTConfig(vocab_size=32, num_classes=3, grid=(3, 4), dim=32, depth=2, heads=2, adaln=True))
    gates, rest = fresh.blocks[0].adaln[1].weight.split([64, 128])
    assert gates.std() < 1e-4 < 5e-3 < rest.std() < 2e-2
    assert torch.count_nonzero(fresh.head.weight) == 0  # zero_init_head


def test_adaln_gates_zero_make_every_block_the_identity():
    model = small_gpt(adaln=True)
    ids, labels = random_batch(model, 3)
    with torch.no_grad():
        for block in model.blocks:
            block.adaln[1].weight[: 2 * model.config.dim].zero_()  # gate1, gate2 = 0
            block.adaln[1].bias[: 2 * model.config.dim].zero_()
        cond = model.class_emb(labels)[:, None]
        x = torch.cat([cond, model.tok_emb(ids[:, :-1])], dim=1)  # the input sequence, untouched by the blocks
        torch.testing.assert_close(model(ids, labels), model.norm(x, cond))


def test_rope_2d_rotates_by_row_then_column_and_leaves_the_prefix_alone():
    h, w, head_dim = 3, 5, 8
    cos, sin = rope_2d_table(h, w, head_dim)
    assert cos.shape == (1 + h * w, head_dim // 2)
    assert torch.equal(cos[0], torch.ones(4)) and torch.equal(sin[0], torch.zeros(4))  # class prefix: identity
    angles = torch.atan2(sin, cos)  # (1 + T, 4): [row * f0, row * f1, col * f0, col * f1], f = (1, 1/100)
    r, c = 2, 3
    torch.testing.assert_close(angles[1 + r * w + c], torch.tensor([r * 1.0, r / 100, c * 1.0, c / 100]))
    # attention scores depend on the 2D offset only: shifting both positions by (1, 1) keeps q . k
    q, k = torch.randn(2, 1, 1, 1, head_dim).unbind(0)  # (B, S, H, hd)

    def score(p1: tuple[int, int], p2: tuple[int, int]) -> torch.Tensor:
        i, j = 1 + p1[0] * w + p1[1], 1 + p2[0] * w + p2[1]
        return (apply_rope(q, cos[i:i + 1], sin[i:i + 1]) * apply_rope(k, cos[j:j + 1], sin[j:j + 1])).sum()

    torch.testing.assert_close(score((0, 1), (1, 3)), score((1, 2), (2, 4)))
    assert not torch.allclose(score((0, 0), (0, 1)), score((0, 0), (1, 0)))  # rows and columns differ


def test_label_dropout_goes_to_the_null_class_at_the_set_rate_in_training_only():
    model = small_gpt(class_dropout=0.1, token_dropout=0.0, grid=(2, 2))
    seen = []
    model.class_emb.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
    labels = torch.randint(0, 3, (4000,), generator=torch.Generator().manual_seed(0))
    ids = torch.zeros(4000, 4, dtype=torch.long)
    torch.manual_seed(0)
    model.train()(ids, labels)
    dropped = seen[-1] != labels
    assert (seen[-1][dropped] == model.null_class).all()
    assert 0.085 < dropped.float().mean() < 0.115
    model.eval()(ids, labels)
    assert torch.equal(seen[-1], labels)


def test_pkeep_replaces_input_ids_at_the_set_rate_and_keeps_targets():
    model = small_gpt(pkeep=0.8, vocab_size=64, grid=(4, 4), token_dropout=0.0, class_dropout=0.0)
    seen = []
    model.tok_emb.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
    ids = torch.randint(0, 64, (500, 16), generator=torch.Generator().manual_seed(0))
    original = ids.clone()
    torch.manual_seed(0)
    model.train()(ids, torch.zeros(500, dtype=torch.long))
    assert torch.equal(ids, original)  # the caller's ids (the targets) are untouched
    changed = (seen[-1] != ids[:, :-1]).float().mean()  # a random id equals the true one 1/64 of the time
    assert abs(changed - 0.2 * 63 / 64) < 0.015
    model.eval()(ids, torch.zeros(500, dtype=torch.long))
    assert torch.equal(seen[-1], ids[:, :-1])


@pytest.mark.parametrize("option", ["token_dropout", "dropout"])
def test_dropouts_act_in_training_mode_only(option):
    quiet = dict(class_dropout=0.0, token_dropout=0.0, dropout=0.0, pkeep=1.0)
    model = small_gpt(**quiet)
    ids, labels = random_batch(model, 4)
    torch.testing.assert_close(model.train()(ids, labels), model.eval()(ids, labels))  # nothing random left
    noisy = small_gpt(**{**quiet, option: 0.5})
    assert (noisy.train()(ids, labels) - noisy.eval()(ids, labels)).abs().max() > 1e-3


def test_training_corruptions_follow_the_global_rng():
    model = small_gpt(pkeep=0.8, class_dropout=0.5, token_dropout=0.1).train()
    ids, labels = random_batch(model, 8)
    torch.manual_seed(3)
    first = model(ids, labels)
    torch.manual_seed(3)
    torch.testing.assert_close(model(ids, labels), first, rtol=0, atol=0)


def test_tiny_gpt_learns_a_fixed_token_pattern_and_samples_it():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=64, num_classes=4, grid=(4, 4), dim=64, depth=2, heads=4,
                       class_dropout=0.0, token_dropout=0.0)
    model = GPT(config)
    pattern = torch.stack([torch.randperm(64)[:16].view(4, 4) for _ in range(4)])  # (classes, 4, 4)
    labels = torch.arange(4).repeat(8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = model.loss(pattern[labels], labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1
    classes = torch.arange(4)
    assert torch.equal(sample(model, classes, temperature=0), pattern)
    for use_cache in (True, False):
        drawn = sample(model, classes, top_k=1, generator=torch.Generator().manual_seed(1), use_cache=use_cache)
        assert torch.equal(drawn, pattern)
    assert model.training  # sample restores the mode it found


def test_param_groups_decay_only_matrices():
    model = small_gpt(positions="learned", adaln=True)
    decay, no_decay = model.param_groups(0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert {id(p) for p in decay["params"] + no_decay["params"]} == {id(p) for p in model.parameters()}
    assert any(p is model.pos_emb for p in decay["params"])
    assert any(p is model.blocks[0].adaln[1].bias for p in no_decay["params"])


# ---------------------------------------------------------------------------------------------------------------
# Config and presets.


# measured with count_parameters at K = 16,384, 1,000 classes, 16 x 16 (the table in ar.py's docstring)
MEASURED = {"tiny": 5_372_160, "small": 13_760_000, "B": 110_888_448, "L": 342_910_976, "XL": 774_699_520,
            "XXL": 1_410_972_672, "ibq-B": 342_994_944, "ibq-L": 649_640_960, "ibq-XL": 1_076_103_168,
            "ibq-XXL": 2_063_331_840, "vqgan-lc": 343_173_120}
PUBLISHED = {"B": 111e6, "L": 343e6, "XL": 775e6, "XXL": 1.4e9, "ibq-B": 342e6, "ibq-XXL": 2.1e9}  # LlamaGen, IBQ


def test_preset_parameter_counts_match_the_table_and_the_papers():
    assert set(MEASURED) == set(PRESETS)
    for name in PRESETS:
        count = count_parameters(get_preset(name, vocab_size=16384, num_classes=1000, grid=(16, 16)))
        assert count == MEASURED[name], name
        if name in PUBLISHED:
            assert abs(count / PUBLISHED[name] - 1) < 0.02, name
    assert PRESETS["L"].hidden_dim == 2816 and PRESETS["B"].hidden_dim == 2048  # 2/3 * 4d rounded up to 256
    lc = PRESETS["vqgan-lc"]
    assert (lc.positions, lc.pkeep, lc.class_dropout, lc.adaln) == ("learned", 0.8, 0.0, False)
    assert all(PRESETS[f"ibq-{s}"].adaln and PRESETS[f"ibq-{s}"].head_dim == 64 for s in ("B", "L", "XL", "XXL"))


def test_config_round_trips_through_json_and_rebuilds_the_same_model():
    config = get_preset("tiny", vocab_size=48, num_classes=5, grid=(2, 3), positions="learned", adaln=True)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["preset"] == "tiny" and data["grid"] == [2, 3]
    rebuilt = GPTConfig.from_dict(data)
    assert rebuilt == config and rebuilt.grid == (2, 3)
    model = GPT(config)
    copy = GPT(rebuilt)
    copy.load_state_dict(model.state_dict())  # strict: the same parameter names and shapes
    assert not any("rope" in k for k in model.state_dict())  # derived buffers are not saved
    partial = GPTConfig.from_dict({"preset": "L", "vocab_size": 100, "grid": [16, 16]})
    assert (partial.depth, partial.dim, partial.heads, partial.vocab_size) == (24, 1024, 16, 100)
    with pytest.raises(ValueError, match="unknown GPT config key"):
        GPTConfig.from_dict({"preset": "tiny", "width": 3})
    with pytest.raises(ValueError, match="unknown GPT preset"):
        get_preset("huge")
    with pytest.raises(ValueError, match="positions"):
        GPTConfig(positions="sinusoidal")
    with pytest.raises(ValueError, match="divisible by 4"):
        GPTConfig(dim=36, heads=6)


# ---------------------------------------------------------------------------------------------------------------
# Sampling.


@pytest.mark.parametrize("variant", VARIANTS)
def test_sampling_with_the_kv_cache_gives_the_same_tokens_as_without(variant):
    model = small_gpt(**VARIANTS[variant])
    labels = torch.tensor([0, 1, 2, 0, 3])  # 3: the null class (unconditional rows)
    kwargs = dict(cfg_scale=2.5, temperature=1.3, top_k=20, top_p=0.95)
    cached = sample(model, labels, generator=torch.Generator().manual_seed(7), **kwargs)
    uncached = sample(model, labels, generator=torch.Generator().manual_seed(7), use_cache=False, **kwargs)
    assert cached.shape == (5, 3, 4) and cached.dtype == torch.long
    assert torch.equal(cached, uncached)
    assert cached.unique().numel() > 8  # really sampled, not a constant map


def test_cfg_scale_one_equals_conditional_sampling():
    model = small_gpt()
    labels = torch.tensor([0, 1, 2, 1])
    plain = sample(model, labels, generator=torch.Generator().manual_seed(3))
    with_uncond_rows = sample(model, labels, generator=torch.Generator().manual_seed(3), guide=True)
    assert torch.equal(plain, with_uncond_rows)
    guided = sample(model, labels, generator=torch.Generator().manual_seed(3), cfg_scale=4.0)
    assert not torch.equal(plain, guided)


def test_cfg_logits_and_schedules():
    cond, uncond = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 1.0, 0.5])
    torch.testing.assert_close(cfg_logits(cond, uncond, 3.0), uncond + 3.0 * (cond - uncond))
    assert torch.equal(cfg_logits(cond, uncond, 1.0), cond)
    assert [cfg_scale_at(s, 5, 3.0) for s in range(5)] == [3.0] * 5
    assert [cfg_scale_at(s, 5, 3.0, "linear") for s in range(5)] == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert cfg_scale_at(0, 1, 3.0, "linear") == 3.0
    with pytest.raises(ValueError, match="schedule"):
        cfg_scale_at(0, 5, 3.0, "cosine")


def test_linear_cfg_schedule_starts_unguided():
    model = small_gpt()
    labels = torch.tensor([0, 1, 2])
    kwargs = dict(temperature=0, cfg_scale=5.0)
    plain = sample(model, labels, temperature=0)
    linear = sample(model, labels, cfg_schedule="linear", **kwargs)
    constant = sample(model, labels, **kwargs)
    assert torch.equal(linear.flatten(1)[:, 0], plain.flatten(1)[:, 0])  # scale 1 at the first token
    assert not torch.equal(linear, constant)


def test_cfg_needs_a_model_trained_with_label_dropout():
    model = small_gpt(class_dropout=0.0)
    with pytest.raises(ValueError, match="label dropout"):
        sample(model, torch.tensor([0]), cfg_scale=2.0)


def test_top_k_keeps_exactly_k_and_ties():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, 2.0, 2.0, 1.0, 2.0]])
    out = top_k_top_p_filter(logits, top_k=2)
    assert torch.equal(torch.isfinite(out[0]), torch.tensor([False, True, False, True, False]))
    assert torch.equal(torch.isfinite(out[1]), torch.tensor([False, True, True, False, True]))  # a tie at the k-th
    torch.testing.assert_close(out[torch.isfinite(out)], logits[torch.isfinite(out)])
    assert torch.equal(top_k_top_p_filter(logits, top_k=5), logits)
    assert torch.equal(top_k_top_p_filter(logits), logits)
    assert torch.isfinite(logits).all()  # not in place


def test_top_p_keeps_the_smallest_set_with_enough_mass():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = probs.log()[None]
    kept = {p: torch.isfinite(top_k_top_p_filter(logits, top_p=p))[0].tolist() for p in (0.3, 0.6, 0.75, 0.9, 0.97)}
    assert kept[0.3] == [False, True, False, False]  # 0.5 >= 0.3 alone
    assert kept[0.6] == [False, True, False, True]  # 0.5 < 0.6 <= 0.8
    assert kept[0.75] == [False, True, False, True]
    assert kept[0.9] == [False, True, True, True]  # 0.8 < 0.9 <= 0.95
    assert kept[0.97] == [True, True, True, True]
    # top-k first, then top-p on the renormalised rest: after top-2, {0.5, 0.3} -> {0.625, 0.375}
    both = torch.isfinite(top_k_top_p_filter(logits, top_k=2, top_p=0.6))[0].tolist()
    assert both == [False, True, False, False]
    assert torch.isfinite(top_k_top_p_filter(logits, top_p=0.0))[0].tolist() == [False, True, False, False]


@pytest.mark.parametrize("option", [{"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"temperature": -0.5}])
def test_sampling_settings_it_cannot_use_are_refused(option):
    with pytest.raises(ValueError, match=next(iter(option))):
        sample(small_gpt(), torch.tensor([0, 1]), **option)
    with pytest.raises(ValueError, match=next(iter(option))):
        GenTrainConfig.from_dict({"sample": option})  # before any training starts


def test_temperature_to_zero_picks_the_argmax():
    model = small_gpt()
    labels = torch.tensor([0, 1, 2])
    greedy = torch.zeros(3, model.seq_len, dtype=torch.long)  # reference: argmax decoding by hand
    with torch.no_grad():
        for t in range(model.seq_len):
            greedy[:, t] = model.logits(model.trunk(labels, greedy[:, :t])[:, -1]).argmax(-1)
    assert torch.equal(sample(model, labels, temperature=0).flatten(1), greedy)
    cold = sample(model, labels, temperature=1e-4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cold.flatten(1), greedy)
    hot = sample(model, labels, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(hot.flatten(1), greedy)


def test_sampling_is_seeded_and_batches_do_not_change_greedy_results():
    model = small_gpt()
    labels = balanced_labels(3, 2)
    a = sample(model, labels, generator=torch.Generator().manual_seed(11))
    b = sample(model, labels, generator=torch.Generator().manual_seed(11))
    c = sample(model, labels, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = sample(model, labels, temperature=0, cfg_scale=2.0)
    assert torch.equal(sample(model, labels, temperature=0, cfg_scale=2.0, batch_size=4), greedy)
    with pytest.raises(ValueError, match="labels must lie"):
        sample(model, torch.tensor([4]))


def test_balanced_labels():
    labels = balanced_labels(4, per_class=3)
    assert labels.dtype == torch.long and labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert torch.equal(torch.bincount(balanced_labels(10)), torch.full((10,), 50))
    assert math.prod(balanced_labels(1000).shape) == 50_000
