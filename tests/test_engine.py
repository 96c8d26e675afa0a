"""The engine against stock transformers, a brute-force reference, itself one sample at a time, and its cache."""

import math

import pytest
import torch
from batches import N_VIS, make_samples, pad_batch, vision_features
from reference import reference_forward

from hidrop.engine import ScheduledModel
from hidrop.schedule import DropEvent, PositionMode, QueryRule, Schedule, Selector, preset, vanilla
from hidrop.selection import dtopk_soft_mask
from hidrop.tiny import TINY_IMAGE_TOKEN, tiny_llama, tiny_llava

ATOL = 2e-4


def _schedules(n_layers=8):
    return {
        "fastv": preset("fastv", n_layers, N_VIS),
        "pdrop": preset("pdrop", n_layers, N_VIS),
        "hidrop": preset("hidrop_tok64", n_layers, N_VIS),
        # explicit schedules that reach every position mode and both scoring conventions
        "hidrop_group": Schedule(
            num_layers=n_layers,
            num_vision_tokens=N_VIS,
            inject_layer=2,
            exit_layer=7,
            drops=(DropEvent(after_layer=3, keep=9), DropEvent(after_layer=5, keep=3, score_layer=5)),
            position_mode=PositionMode.group,
            name="group",
        ),
        "compacted_inject": Schedule(
            num_layers=n_layers,
            num_vision_tokens=N_VIS,
            inject_layer=3,
            exit_layer=8,
            drops=(DropEvent(after_layer=4, keep_ratio=0.5), DropEvent(after_layer=6, keep=2)),
            position_mode=PositionMode.compacted,
            name="compacted_inject",
        ),
    }


def _learnable(num_vision_tokens: int, drops: tuple) -> Schedule:
    """A learnable-ratio schedule on the 8-layer tiny model: inject at L2, exit at L8, (after_layer, keep) drops."""
    return Schedule(
        num_layers=8,
        num_vision_tokens=num_vision_tokens,
        inject_layer=2,
        exit_layer=8,
        selector=Selector.dtopk_learnable,
        drops=[{"after_layer": layer, "keep": k} for layer, k in drops],
    )


def _llama_inputs(samples, left=True):
    ids, vis, am = pad_batch(samples, left=left)
    feats = vision_features(samples)
    return ids, vis, am, torch.cat(feats)


def _sample_embeds(sm, ids, vis, feats):
    e = sm.backbone.embed(ids)
    if vis.any():
        e = e.clone()
        e[vis] = feats
    return e


# ---- 1. keep-everything == stock transformers ------------------------------------------------
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("batch", [1, 3])
def test_vanilla_matches_stock_llama(impl, batch):
    model = tiny_llama(attn_implementation=impl)
    samples = make_samples(lengths=((5, 9), (2, 4), (7, 3))[:batch])
    ids, vis, am = pad_batch(samples, left=True)
    ids = ids.masked_fill(vis, 5)  # a plain LM: no image positions
    pos = (am.cumsum(1) - 1).clamp(min=0)
    # the first real token is never a target (HF would let a padding row predict it; we do not)
    labels = ids.masked_fill((am == 0) | (pos == 0), -100)
    stock = model(input_ids=ids, attention_mask=am, position_ids=pos, labels=labels)
    ours = ScheduledModel(model, vanilla(8, N_VIS))(ids, am, labels=labels)
    real = am.bool()
    assert torch.allclose(stock.logits[real], ours.logits[real], atol=ATOL)
    assert torch.allclose(stock.loss, ours.loss, atol=1e-5)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("batch", [1, 3])
def test_vanilla_matches_stock_llava(impl, batch):
    model = tiny_llava(attn_implementation=impl)
    samples = make_samples(lengths=((5, 9), (2, 4), (7, 3))[:batch])
    ids, vis, am = pad_batch(samples, left=True)
    pixels = torch.randn(batch, 3, 32, 32)
    pos = (am.cumsum(1) - 1).clamp(min=0)
    labels = ids.masked_fill((am == 0) | vis | (pos == 0), -100)
    stock = model(input_ids=ids, attention_mask=am, position_ids=pos, pixel_values=pixels, labels=labels)
    ours = ScheduledModel(model, vanilla(8, N_VIS))(ids, am, pixel_values=pixels, labels=labels)
    real = am.bool()
    assert torch.allclose(stock.logits[real], ours.logits[real], atol=ATOL)
    assert torch.allclose(stock.loss, ours.loss, atol=1e-5)


# ---- 2. engine == brute-force reference ------------------------------------------------------
@pytest.mark.parametrize("name", list(_schedules()))
@pytest.mark.parametrize("left", [True, False])
def test_engine_matches_reference(name, left):
    schedule = _schedules()[name]
    model = tiny_llama(attn_implementation="sdpa")
    sm = ScheduledModel(model, schedule, image_token_id=TINY_IMAGE_TOKEN)
    samples = make_samples()
    ids, vis, am, feats = _llama_inputs(samples, left=left)
    with torch.no_grad():
        out = sm(ids, am, vision_embeds=feats)
    per_sample_feats = vision_features(samples)
    for row, ((s_ids, s_vis), s_feats) in enumerate(zip(samples, per_sample_feats)):
        ref_logits, alive, keeps, _ = reference_forward(sm, _sample_embeds(sm, s_ids, s_vis, s_feats), s_vis)
        cols = am[row].nonzero()[:, 0]
        ours = out.logits[row, cols]
        live = torch.tensor(alive)
        assert torch.allclose(ours[live], ref_logits[live], atol=ATOL), (name, row)
        if s_vis.any():
            for drop_index, chosen in enumerate(keeps):
                ours_kept = set(out.keep_masks[drop_index][row, cols].nonzero()[:, 0].tolist())
                assert ours_kept == chosen, (name, row, drop_index)
        counts = out.layer_vision_counts[:, row].tolist()
        expected = schedule.tokens_per_layer() if s_vis.any() else [0] * schedule.num_layers
        assert counts == expected


@pytest.mark.parametrize("name", list(_schedules()))
def test_training_selection_is_the_prompts_at_inference(name):
    """With labels, last-prompt scores with the token before the answer: the vision tokens a training
    forward keeps are those the same prompt keeps at inference, never chosen by reading the answer."""
    schedule = _schedules()[name]
    sm = ScheduledModel(tiny_llama(attn_implementation="eager"), schedule, image_token_id=TINY_IMAGE_TOKEN)
    answer = 5
    full = make_samples(lengths=((3, 6 + answer), (0, 4 + answer), (5, 2 + answer)))
    feats = torch.cat(vision_features(full))
    prompts = [(ids[:-answer], vis[:-answer]) for ids, vis in full]
    ids, vis, am = pad_batch(full, left=False)  # training batches pad right
    labels = torch.full_like(ids, -100)
    for row, (s_ids, _) in enumerate(full):
        labels[row, len(s_ids) - answer : len(s_ids)] = s_ids[-answer:]
    p_ids, p_vis, p_am = pad_batch(prompts, left=True)  # generation pads left
    with torch.no_grad():
        trained = sm(ids, am, vision_embeds=feats, labels=labels)
        prompted = sm(p_ids, p_am, vision_embeds=feats)
        read_answer = sm(ids, am, vision_embeds=feats)  # the control: scored from the answer's last token
    assert len(trained.keep_masks) == len(schedule.drops) > 0
    differs = False
    for drop, (t, p, r) in enumerate(zip(trained.keep_masks, prompted.keep_masks, read_answer.keep_masks)):
        for row in range(len(full)):
            t_cols, p_cols = am[row].nonzero()[:, 0], p_am[row].nonzero()[:, 0]
            kept = t[row, t_cols[: len(p_cols)]]
            assert torch.equal(kept, p[row, p_cols]), (name, drop, row)
            differs |= not torch.equal(r[row, t_cols[: len(p_cols)]], p[row, p_cols])
    assert differs, "the control should keep other tokens somewhere, or the test proves nothing"


def test_multi_round_training_matches_reference():
    schedule = _schedules()["hidrop_group"].model_copy(update={"query_rule": QueryRule.multi_round})
    schedule = Schedule.model_validate(schedule.model_dump())
    model = tiny_llama(attn_implementation="eager")
    sm = ScheduledModel(model, schedule, image_token_id=TINY_IMAGE_TOKEN)
    samples = make_samples(lengths=((3, 12), (4, 10), None))
    ids, vis, am, feats = _llama_inputs(samples, left=False)
    labels = torch.full_like(ids, -100)
    # two answer spans in row 0 (multi-round), one in row 1, none in the text-only row 2
    labels[0, 3 + N_VIS + 2 : 3 + N_VIS + 5] = ids[0, 3 + N_VIS + 2 : 3 + N_VIS + 5]
    labels[0, 3 + N_VIS + 8 : 3 + N_VIS + 11] = ids[0, 3 + N_VIS + 8 : 3 + N_VIS + 11]
    # plain (pretraining) format in row 1: the answer starts right after the image, so the query row is
    # the last image token until a drop removes it, then the last live token before the answer
    labels[1, 4 + N_VIS : 4 + N_VIS + 9] = ids[1, 4 + N_VIS : 4 + N_VIS + 9]
    out = sm(ids, am, vision_embeds=feats, labels=labels)
    total_nll, total_n = 0.0, 0
    for row, ((s_ids, s_vis), s_feats) in enumerate(zip(samples, vision_features(samples))):
        n = len(s_ids)
        ref_logits, alive, keeps, ref_loss = reference_forward(
            sm, _sample_embeds(sm, s_ids, s_vis, s_feats), s_vis, labels=labels[row, :n]
        )
        live = torch.tensor(alive)
        assert torch.allclose(out.logits[row, :n][live], ref_logits[live], atol=ATOL)
        for drop_index, chosen in enumerate(keeps):
            assert set(out.keep_masks[drop_index][row, :n].nonzero()[:, 0].tolist()) == chosen
        k = int((labels[row, :n][live][1:] != -100).sum())
        total_nll, total_n = total_nll + float(ref_loss) * k, total_n + k
    assert abs(out.loss.item() - total_nll / total_n) < 1e-4
    assert out.layer_vision_counts[:, 1].tolist() == schedule.tokens_per_layer()  # row 1 pruned at every drop


def test_llava_schedule_matches_reference():
    model = tiny_llava(attn_implementation="sdpa")
    sm = ScheduledModel(model, _schedules()["hidrop"])
    samples = make_samples(lengths=((5, 9), None, (2, 4)))
    ids, vis, am = pad_batch(samples, left=True)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = sm(ids, am, pixel_values=pixels)
        feats = sm.backbone.image_features(pixels).view(2, N_VIS, -1)
    image_rows = iter(feats)
    for row, (s_ids, s_vis) in enumerate(samples):
        f = next(image_rows) if s_vis.any() else None
        ref_logits, alive, _, _ = reference_forward(sm, _sample_embeds(sm, s_ids, s_vis, f), s_vis)
        cols = am[row].nonzero()[:, 0]
        live = torch.tensor(alive)
        assert torch.allclose(out.logits[row, cols][live], ref_logits[live], atol=ATOL)


# ---- 3, 4, 6. cache, generation, batching ---------------------------------------------------
@pytest.mark.parametrize("name", ["fastv", "pdrop", "hidrop", "hidrop_group"])
def test_cached_generation_equals_recomputation(name):
    sm = ScheduledModel(tiny_llama(), _schedules()[name], image_token_id=TINY_IMAGE_TOKEN)
    samples = make_samples()
    ids, vis, am, feats = _llama_inputs(samples, left=True)
    seq, cache, keeps = sm.generate(ids, am, vision_embeds=feats, max_new_tokens=6, return_cache=True)
    assert cache.get_seq_length() == seq.shape[1] - 1  # logical length: the last token is not yet fed
    L = ids.shape[1]
    for t in range(1, seq.shape[1] - L + 1):
        prefix = seq[:, : L + t - 1]
        mask = torch.cat([am, torch.ones(len(samples), t - 1, dtype=am.dtype)], 1)
        forced = [torch.nn.functional.pad(k, (0, t - 1)) for k in keeps]
        with torch.no_grad():
            full = sm(
                prefix,
                mask,
                vision_embeds=feats,
                vision_mask=torch.nn.functional.pad(vis, (0, t - 1)),
                forced_keep=forced,
                logits_to_keep=1,
            )
        assert torch.equal(full.logits[:, -1].argmax(-1), seq[:, L + t - 1]), (name, t)


def test_cached_logits_equal_recomputed_logits():
    sm = ScheduledModel(tiny_llama(), _schedules()["compacted_inject"], image_token_id=TINY_IMAGE_TOKEN)
    samples = make_samples()
    ids, vis, am, feats = _llama_inputs(samples, left=True)
    with torch.no_grad():
        pre = sm(ids, am, vision_embeds=feats, use_cache=True, logits_to_keep=1)
        nxt = torch.randint(3, 100, (len(samples), 3))
        cached = sm(nxt, past_key_values=pre.past_key_values).logits
        full = sm(
            torch.cat([ids, nxt], 1),
            torch.cat([am, torch.ones_like(nxt)], 1),
            vision_embeds=feats,
            vision_mask=torch.nn.functional.pad(vis, (0, 3)),
            forced_keep=[torch.nn.functional.pad(k, (0, 3)) for k in pre.keep_masks],
        )
    assert torch.allclose(cached, full.logits[:, -3:], atol=ATOL)


@pytest.mark.parametrize("name", ["vanilla", "fastv", "pdrop", "hidrop"])
def test_batch_equals_one_by_one(name):
    schedule = vanilla(8, N_VIS) if name == "vanilla" else _schedules()[name]
    sm = ScheduledModel(tiny_llama(), schedule, image_token_id=TINY_IMAGE_TOKEN)
    samples = make_samples()
    ids, vis, am, feats = _llama_inputs(samples, left=True)
    batched = sm.generate(ids, am, vision_embeds=feats, max_new_tokens=8)
    per_feats = vision_features(samples)
    for row, ((s_ids, s_vis), f) in enumerate(zip(samples, per_feats)):
        alone = sm.generate(s_ids[None], vision_embeds=f if s_vis.any() else None, max_new_tokens=8)
        assert torch.equal(batched[row, ids.shape[1] :], alone[0, len(s_ids) :]), (name, row)
        with torch.no_grad():
            a = sm(s_ids[None], vision_embeds=f if s_vis.any() else None).logits[0]
            b = sm(ids, am, vision_embeds=feats).logits[row, am[row].bool()]
        assert torch.allclose(a, b, atol=ATOL)


def test_scoring_pass_never_writes_the_cache():
    schedule = _schedules()["hidrop_group"]  # scores with the next layer AND with a layer's own q/k
    sm = ScheduledModel(tiny_llama(), schedule, image_token_id=TINY_IMAGE_TOKEN)
    ids, vis = make_samples(lengths=((5, 9),))[0]
    feats = vision_features([(ids, vis)])[0]
    with torch.no_grad():
        out = sm(ids[None], vision_embeds=feats, use_cache=True)
        cache = out.past_key_values
        text = int((~vis).sum())
        assert [cache.physical_length(i) for i in range(8)] == [text + n for n in schedule.tokens_per_layer()]
        sm(torch.tensor([[7]]), past_key_values=cache)
        assert [cache.physical_length(i) for i in range(8)] == [text + n + 1 for n in schedule.tokens_per_layer()]
        assert cache.get_seq_length() == len(ids) + 1


# ---- 7. DTop-K ---------------------------------------------------------------------------------
def test_dtopk_learnable_ratio_gets_gradient_and_keeps_exact_topk():
    base = _schedules()["hidrop"]
    schedule = Schedule.model_validate({**base.model_dump(), "selector": Selector.dtopk_learnable})
    sm = ScheduledModel(tiny_llama(), schedule, image_token_id=TINY_IMAGE_TOKEN, budget_weight=0.0)
    sm.train()
    samples = make_samples()
    ids, vis, am, feats = _llama_inputs(samples, left=False)
    labels = ids.masked_fill((am == 0) | vis, -100)
    out = sm(ids, am, vision_embeds=feats, labels=labels)
    out.loss.backward()
    assert sm.keep_fraction_log.grad is not None and sm.keep_fraction_log.grad.abs().sum() > 0
    # the forward pass is the hard selection: identical to the released (fixed-ratio) selector
    fixed = ScheduledModel(sm.model, base, image_token_id=TINY_IMAGE_TOKEN)
    with torch.no_grad():
        ref = fixed(ids, am, vision_embeds=feats, labels=labels)
    assert all(torch.equal(a, b) for a, b in zip(out.keep_masks, ref.keep_masks))
    assert torch.allclose(out.loss.detach(), ref.loss, atol=1e-5)


def test_budget_loss_pulls_keep_ratio_toward_target():
    base = _schedules()["hidrop"]
    schedule = Schedule.model_validate({**base.model_dump(), "selector": Selector.dtopk_learnable})
    sm = ScheduledModel(tiny_llama(), schedule, budget_target=1.0)
    loss = sm.budget_loss()
    loss.backward()
    assert loss.item() > 0 and bool((sm.keep_fraction_log.grad > 0).all())  # gradient descent lowers the counts
    at_target = ScheduledModel(tiny_llama(), schedule)
    assert at_target.budget_loss().item() == pytest.approx(0.0, abs=1e-10)


def test_dtopk_temperature_is_the_candidate_count():
    """Three live candidates of an image of 196, keep 2: c' = 1/3, 2/3, 1 and lambda = 3, a = 1 - 2/3, so
    m = sigmoid(3 c' - 1) = sigmoid(0), sigmoid(1), sigmoid(2): the boundary token sits on the slope."""
    scores = torch.tensor([[0.1, 0.5, 0.9, 0.0]])
    live = torch.tensor([[True, True, True, False]])
    fraction = torch.tensor(2 / 196, requires_grad=True)
    soft = dtopk_soft_mask(scores, live, fraction, 196)
    expected = torch.sigmoid(torch.tensor([0.0, 1.0, 2.0]))
    assert torch.allclose(soft[0, :3], expected, atol=1e-6) and soft[0, 3] == 0
    soft.sum().backward()
    # dm/dk = m (1 - m), k = 196 f: the count's gradient is alive (a temperature of 196 gives ~1e-27)
    hand = float((expected * (1 - expected)).sum() * 196)
    assert fraction.grad.item() == pytest.approx(hand, rel=1e-5)


def test_every_learnable_ratio_gets_gradient_from_the_lm_loss():
    """Drops among few live tokens still pass gradient to their ratio (live-count temperature)."""
    schedule = _learnable(N_VIS, ((2, 8), (4, 3), (6, 2)))
    sm = ScheduledModel(tiny_llama(), schedule, image_token_id=TINY_IMAGE_TOKEN, budget_weight=0.0)
    sm.train()
    ids, vis, am, feats = _llama_inputs(make_samples(), left=False)
    sm(ids, am, vision_embeds=feats, labels=ids.masked_fill((am == 0) | vis, -100)).loss.backward()
    assert bool((sm.keep_fraction_log.grad != 0).all()), sm.keep_fraction_log.grad


def test_small_drops_move_by_their_share_and_come_back_from_the_floor():
    """Log-scale ratios: one optimizer step moves a 2-token drop by the same share as a 453-token one (in
    plain fractions it crossed the 1-token floor at once), and a drop at the floor, where a plain clamp
    passes no gradient, rises again when the loss asks for more tokens."""
    schedule = _learnable(576, ((3, 453), (4, 10), (5, 2), (6, 1)))
    sm = ScheduledModel(tiny_llama(), schedule, budget_weight=0.0)
    optimizer = torch.optim.Adam([sm.keep_fraction_log], lr=1e-2)

    def step(sign: float) -> list[float]:
        optimizer.zero_grad()
        (sign * sm._clamped_fractions() * 576).sum().backward()
        optimizer.step()
        return (sm._clamped_fractions() * 576).detach().tolist()

    fewer = step(+1.0)  # Adam's first step is lr in every coordinate: each count shrinks by 1%
    assert fewer[:3] == pytest.approx([k * math.exp(-1e-2) for k in (453, 10, 2)], rel=1e-4)
    assert fewer[3] == 1.0  # held at the floor
    for _ in range(30):
        more = step(-1.0)
    assert more[3] > 1.1 and all(m > k for m, k in zip(more, (453, 10, 2)))


def test_budget_is_one_sided_and_its_target_anneals_from_keep_all():
    base = _schedules()["hidrop"]
    schedule = Schedule.model_validate({**base.model_dump(), "selector": Selector.dtopk_learnable})
    sm = ScheduledModel(tiny_llama(), schedule, budget_target=1.0, budget_anneal=0.5)
    sm.budget_progress = 0.0  # the target is keeping every token: nothing is over it
    assert sm.budget_loss().item() == 0.0
    sm.budget_progress = 0.5  # annealed: the budget itself
    at_end = sm.budget_loss().item()
    sm.budget_progress = 1.0
    assert at_end > 0 and sm.budget_loss().item() == at_end
    under = ScheduledModel(tiny_llama(), schedule, budget_target=schedule.avg_tokens() + 2)
    assert under.budget_loss().item() == 0.0  # below the budget: no pull either way


def test_learnable_ratios_anneal_down_to_the_budget():
    """A planted objective: a reward for every kept token (standing in for a task that wants more) against
    a budget 3 tokens per layer under the start. The ratios, in their own group at their own rate, first
    rise while the target is keep-all, then come down and end within a token of the budget."""
    from hidrop.training import lr_at, parameter_groups, set_lr

    schedule = _learnable(576, ((3, 288), (5, 96), (6, 24)))
    budget = schedule.avg_tokens() - 3
    sm = ScheduledModel(tiny_llama(), schedule, budget_target=budget, budget_weight=5.0, budget_anneal=0.5)
    recipe = type("R", (), {"lr": 1e-4, "ratio_lr": 2e-3, "weight_decay": 0.1})()
    groups = parameter_groups(sm, recipe)
    assert [len(g["params"]) for g in groups][-1] == 1 and groups[-1]["weight_decay"] == 0.0
    optimizer = torch.optim.AdamW(groups, lr=recipe.lr)
    start = [float(f) * 576 for f in sm.keep_fractions.detach()]
    steps, peak = 600, 0.0
    for step in range(steps):
        sm.budget_progress = step / steps
        average = sm._layer_counts(sm._clamped_fractions()).mean()
        loss = sm.budget_loss() - average / budget  # the planted reward: each 1% more tokens lowers the loss 1%
        optimizer.zero_grad()
        loss.backward()
        set_lr(optimizer, lr_at(step, steps, recipe.lr, "cosine", 0.0))  # the weights' rate decays
        optimizer.step()
        peak = max(peak, float(average.detach()))
    end = float(sm._layer_counts(sm._clamped_fractions()).mean().detach())
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(0.0, abs=1e-8), recipe.ratio_lr]
    assert peak > schedule.avg_tokens() + 3  # free to rise while the target was keep-all
    assert abs(end - budget) <= 1.0, (start, end, budget)
    assert all(e < s for e, s in zip((float(f) * 576 for f in sm.keep_fractions.detach()), start))


# ---- training path -----------------------------------------------------------------------------
def test_gradient_checkpointing_gives_the_same_gradients():
    schedule = _schedules()["hidrop"]
    samples = make_samples()
    ids, vis, am, feats = _llama_inputs(samples, left=False)
    labels = ids.masked_fill((am == 0) | vis, -100)
    grads = []
    for ckpt in (False, True):
        sm = ScheduledModel(tiny_llama(), schedule, image_token_id=TINY_IMAGE_TOKEN)
        sm.train()
        if ckpt:
            sm.gradient_checkpointing_enable()
        sm(ids, am, vision_embeds=feats, labels=labels).loss.backward()
        grads.append(sm.model.model.layers[3].mlp.down_proj.weight.grad.clone())
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_flops_budget_loss():
    base = _schedules()["hidrop"]
    schedule = Schedule.model_validate({**base.model_dump(), "selector": Selector.dtopk_learnable})
    sm = ScheduledModel(tiny_llama(), schedule, budget_kind="flops", budget_target=2.0)
    loss = sm.budget_loss()
    loss.backward()
    assert loss.item() > 0 and bool((sm.keep_fraction_log.grad > 0).all())
    at_target = ScheduledModel(tiny_llama(), schedule, budget_kind="flops")
    assert at_target.budget_loss().item() == pytest.approx(0.0, abs=1e-12)


def test_learnable_fractions_stay_fp32_under_bf16():
    schedule = Schedule.model_validate(
        {**preset("hidrop_tok80", 8, 576).model_dump(), "selector": Selector.dtopk_learnable}
    )
    sm = ScheduledModel(tiny_llama(), schedule).to(torch.bfloat16)
    assert sm.keep_fractions.dtype == torch.float32
    assert [round(float(f) * 576) for f in sm.keep_fractions.detach()] == schedule.keep_counts
    # what DeepSpeed's bf16 optimizers do: every parameter becomes a view into one bf16 buffer
    flat = torch.cat([p.detach().reshape(-1).bfloat16() for p in sm.parameters()])
    offset = 0
    for p in sm.parameters():
        p.data = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    assert [round(float(f) * 576) for f in sm.keep_fractions.detach()] == schedule.keep_counts
    step = torch.tensor(math.log(0.9)).bfloat16()  # a learned 10% fewer tokens, as bf16 holds it
    with torch.no_grad():
        sm.keep_fraction_log.add_(step)
    shrunk = [k * math.exp(float(step)) for k in schedule.keep_counts]  # the start kept in fp32, unrounded
    assert [float(f) * 576 for f in sm.keep_fractions.detach()] == pytest.approx(shrunk, abs=1e-3)


def test_wrong_inputs_are_named():
    sm = ScheduledModel(tiny_llama(), _schedules()["hidrop"], image_token_id=TINY_IMAGE_TOKEN)
    ids, vis = make_samples(lengths=((5, 9),))[0]
    with pytest.raises(ValueError, match="no pixel_values / vision_embeds"):
        sm(ids[None])
    with pytest.raises(ValueError, match="0 or 16 vision tokens"):
        sm(ids[None, :-12], vision_embeds=torch.randn(int(vis[:-12].sum()), 64))
    ends_with_image = torch.cat([ids[:5], ids[vis]])
    with pytest.raises(ValueError, match="must end with text"):
        sm.generate(ends_with_image[None], vision_embeds=torch.randn(N_VIS, 64), max_new_tokens=2)
    with pytest.raises(ValueError, match="is for 8 layers but the model has 4"):
        ScheduledModel(tiny_llama(num_layers=4), _schedules()["hidrop"])


def test_learned_schedule_exports_the_learned_keep_counts():
    schedule = _learnable(576, ((3, 453), (4, 10), (5, 5), (6, 1)))
    sm = ScheduledModel(tiny_llama(), schedule)
    assert sm.learned_schedule() == schedule  # nothing learned yet
    with torch.no_grad():  # the first stage learned to keep 40 fewer tokens, the others collapsed below 1
        n = len(schedule.drops)
        sm.keep_fraction_log.copy_(torch.tensor([math.log(413 / 453)] + [-10.0] * (n - 1)))
    learned = sm.learned_schedule()
    k = schedule.keep_counts
    assert n >= 3 and learned.keep_counts == [k[0] - 40, *range(n - 1, 0, -1)]  # clamped: still decreasing, >= 1
    assert [d.after_layer for d in learned.drops] == [d.after_layer for d in schedule.drops]
    fixed = preset("hidrop_tok64", 8, 576)
    assert ScheduledModel(tiny_llama(), fixed).learned_schedule() is fixed


def _decoupling_case(device: str):
    torch.manual_seed(0)
    model = tiny_llava(attn_implementation="sdpa").to(device)
    samples = make_samples(lengths=((5, 9), None, (2, 4)))
    ids, _, am = pad_batch(samples, left=True)
    ids, am = ids.to(device), am.to(device)
    labels = ids.masked_fill(am == 0, -100)
    pixels = torch.randn(2, 3, 32, 32, device=device)
    results = []
    for parallel in (False, True):
        sm = ScheduledModel(model, _schedules()["hidrop"], parallel_vision=parallel)
        if (
            device == "cuda"
        ):  # keep the side stream busy: a missing wait at the injection layer reads unfinished features
            encode = sm.backbone.image_features
            sm.backbone.image_features = lambda pixels, encode=encode: (torch.cuda._sleep(50_000_000), encode(pixels))[
                1
            ]
        model.zero_grad(set_to_none=True)
        out = sm(ids, am, pixel_values=pixels, labels=labels)
        out.loss.backward()
        projector_grads = [p.grad.clone() for p in sm.backbone.projector.parameters()]
        with torch.no_grad():
            tokens = sm.generate(ids, am, pixel_values=pixels, max_new_tokens=4)
        results.append((out.logits.detach(), out.loss.detach(), projector_grads, tokens))
    return results


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_parallel_vision_decoupling_gives_identical_outputs(device):
    """Late injection lets the encoder run beside the text-only shallow layers (a side stream on CUDA,
    deferred injection on CPU): logits, loss, the projector's gradients and generated tokens equal the
    embed-everything-first path."""
    (logits_a, loss_a, grads_a, tokens_a), (logits_b, loss_b, grads_b, tokens_b) = _decoupling_case(device)
    assert torch.allclose(logits_a, logits_b, atol=1e-5) and torch.allclose(loss_a, loss_b, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_a, grads_b))
    assert any(bool(g.abs().sum() > 0) for g in grads_b)  # the image really flows into the loss
    assert torch.equal(tokens_a, tokens_b)


@pytest.mark.gpu
@pytest.mark.parametrize("left", [True, False])
def test_flash_attention_matches_sdpa(left):
    """The engine's FlashAttention path (2D padding masks per stage, no position ids handed to the kernel
    wrapper, so persistent positions with gaps are not taken for packed sequences) matches SDPA on the
    same fp16 weights: prefill logits where live, the loss, and cached decode steps, for a padded batch
    and for a single row (no mask at all)."""
    pytest.importorskip("flash_attn")
    torch.manual_seed(0)
    sdpa = tiny_llama(attn_implementation="sdpa").to("cuda", torch.float16)
    flash = tiny_llama(attn_implementation="flash_attention_2").to("cuda", torch.float16)
    flash.load_state_dict(sdpa.state_dict())
    samples = make_samples()
    ids, vis, am, feats = _llama_inputs(samples, left=left)
    ids, vis, am, feats = ids.cuda(), vis.cuda(), am.cuda(), feats.cuda().half()
    labels = ids.masked_fill(am == 0, -100)
    for name, schedule in _schedules().items():
        for rows in (slice(None), slice(0, 1)):  # the batch, and one unpadded row (if left padding keeps it so)
            r_ids, r_vis, r_am, r_lab = ids[rows], vis[rows], am[rows], labels[rows]
            r_feats = feats[: int(r_vis.sum())] if rows == slice(0, 1) else feats
            if rows == slice(0, 1):
                keep = r_am[0].bool()
                r_ids, r_vis, r_am, r_lab = r_ids[:, keep], r_vis[:, keep], None, r_lab[:, keep]
            outs = []
            with torch.no_grad():
                for model in (sdpa, flash):
                    sm = ScheduledModel(model, schedule)
                    out = sm(r_ids, r_am, vision_embeds=r_feats, vision_mask=r_vis, labels=r_lab, logits_to_keep=0)
                    outs.append(out)
            live = (outs[0].logits.abs().sum(-1) > 0) & (r_am.bool() if r_am is not None else True)
            assert torch.allclose(outs[0].logits[live].float(), outs[1].logits[live].float(), atol=2e-2, rtol=2e-2), (
                name
            )
            assert abs(outs[0].loss.item() - outs[1].loss.item()) < 2e-2, name
        if left:  # cached generation needs left padding
            steps = []
            with torch.no_grad():
                for model in (sdpa, flash):
                    sm = ScheduledModel(model, schedule)
                    seq, cache, _ = sm.generate(
                        ids, am, vision_embeds=feats, vision_mask=vis, max_new_tokens=1, return_cache=True
                    )
                    nxt = sm(seq[:, -1:], past_key_values=cache, logits_to_keep=1).logits
                    steps.append(nxt.float())
            assert torch.allclose(steps[0], steps[1], atol=2e-2, rtol=2e-2), name
