"""On-policy context distillation: the sampled-token reverse-KL gradient by hand, seeded sampling, end to end."""

import math

import pytest
import torch
from hydra.utils import instantiate

from ctxdistill.config import ConfigError, validate
from ctxdistill.data import build_task
from ctxdistill.encoding import SharedPrefix, answer_logits, encode
from ctxdistill.generation import generate, pick_tokens
from ctxdistill.losses import reverse_kl, sampled_reverse_kl
from ctxdistill.models import ModelHandle, TrainableContext, add_lora, load_model, load_tokenizer
from ctxdistill.run import run

from conftest import TINY, behaving_teacher_overrides, with_bos

P_S = [0.5, 0.3, 0.2]  # student
P_T = [0.7, 0.2, 0.1]  # teacher


def sampled_loss(token: int):
    logits = torch.tensor(P_S).log().view(1, 1, 3).requires_grad_()
    loss = sampled_reverse_kl(
        logits, torch.tensor(P_T).log().view(1, 1, 3), torch.tensor([[token]]), torch.ones(1, 1, dtype=torch.bool)
    )
    loss.backward()
    return loss.item(), logits.grad.view(3)


def test_sampled_token_reverse_kl_gradient_matches_the_hand_computation():
    # x = 1: k = ln(.3/.2) = 0.405465; d/dz [k * log p_S(1)] = k * (onehot(1) - p_S)
    value, grad = sampled_loss(1)
    assert value == pytest.approx(0.405465, abs=1e-5)
    assert grad.tolist() == pytest.approx([-0.202733, 0.283826, -0.081093], abs=1e-5)
    # x = 0: k = ln(.5/.7) = -0.336472 < 0, so a descent step raises p_S(0), which the teacher prefers more.
    value, grad = sampled_loss(0)
    assert value == pytest.approx(-0.336472, abs=1e-5)
    assert grad.tolist() == pytest.approx([-0.168236, 0.100942, 0.067294], abs=1e-5)


def test_sampled_token_gradient_is_unbiased_for_the_exact_reverse_kl():
    # E_{x~p_S}[k(x) (onehot(x) - p_S)] = p_S * (ln(p_S/p_T) - KL(p_S||p_T)), the exact gradient.
    kl = sum(s * math.log(s / t) for s, t in zip(P_S, P_T))
    exact = [s * (math.log(s / t) - kl) for s, t in zip(P_S, P_T)]
    expected_grad = sum(p * sampled_loss(x)[1] for x, p in enumerate(P_S))
    assert expected_grad.tolist() == pytest.approx(exact, abs=1e-6)
    expected_value = sum(p * sampled_loss(x)[0] for x, p in enumerate(P_S))
    assert expected_value == pytest.approx(kl, abs=1e-6)


def test_sampled_token_gradient_equals_trls_sdft_sampled_token_loss():
    trl_loss = pytest.importorskip("trl.experimental.sdft.loss_utils")  # the `bench` extra, which the set-up installs
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 40, generator=generator).mul(3).requires_grad_()
    teacher = torch.randn(2, 3, 40, generator=generator).mul(3)
    tokens = torch.randint(0, 40, (2, 3), generator=generator)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    (ours,) = torch.autograd.grad(sampled_reverse_kl(student, teacher, tokens, mask), student)
    # TRL's per-token loss, averaged over the unmasked tokens: its value is not the KL estimate, its gradient is ours
    per_token = trl_loss.compute_sampled_token_self_distillation_loss(student, teacher, tokens, distillation_alpha=1.0)
    (trls,) = torch.autograd.grad((per_token * mask).sum() / mask.sum(), student)
    torch.testing.assert_close(ours, trls, rtol=1e-5, atol=1e-7)


def exact_reverse_kl_gradient(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    logits = student_logits.clone().requires_grad_()
    reverse_kl(logits.log_softmax(-1), teacher_logp).sum().backward()
    return logits.grad


@pytest.mark.parametrize("sampler", ["student at temperature 2", "teacher (lambda < 1)", "teacher at temperature 0.5"])
def test_importance_weights_keep_the_sampled_gradient_unbiased_for_other_samplers(sampler):
    student = torch.tensor(P_S).log()
    teacher = torch.tensor(P_T).log()
    q = {
        "student at temperature 2": (student / 2).softmax(-1),
        "teacher (lambda < 1)": teacher.softmax(-1),
        "teacher at temperature 0.5": (teacher / 0.5).softmax(-1),
    }[sampler]

    def expected(weighted: bool) -> torch.Tensor:
        total = torch.zeros(3)
        for x in range(3):
            logits = student.view(1, 1, 3).clone().requires_grad_()
            sampling = q[x].log().view(1, 1) if weighted else None
            sampled_reverse_kl(
                logits, teacher.view(1, 1, 3), torch.tensor([[x]]), torch.ones(1, 1, dtype=torch.bool), sampling
            ).backward()
            total += q[x] * logits.grad.view(3)
        return total

    exact = exact_reverse_kl_gradient(student, teacher)
    assert expected(weighted=True).tolist() == pytest.approx(exact.tolist(), abs=1e-6)
    assert expected(weighted=False).tolist() != pytest.approx(exact.tolist(), abs=1e-3)  # the old estimator's bias


def test_a_padding_position_far_from_the_sampler_leaves_the_weighted_loss_finite():
    """Padding left of a shorter sample holds no sampled token: its log-ratio log p_S(pad) - log q(pad) can
    exceed float range after the exp (SmolLM2-135M at temperature 0.2: 94 nats), and inf times a zero mask is
    NaN. The loss and gradient are the valid position's alone: w k and w k (onehot(1) - p_S), by hand."""
    logits = torch.tensor([[1.0, 1.0, 1.0], P_S]).log().view(1, 2, 3).requires_grad_()
    teacher = torch.tensor([P_T, P_T]).log().view(1, 2, 3)
    sampling = torch.tensor([[-200.0, math.log(0.4)]])  # padding: q(pad) = e^-200; then x = 1 drawn with q = 0.4
    mask = torch.tensor([[False, True]])
    loss = sampled_reverse_kl(logits, teacher, torch.tensor([[2, 1]]), mask, sampling)
    loss.backward()
    w, k = 0.3 / 0.4, math.log(0.3 / 0.2)
    assert loss.item() == pytest.approx(w * k, abs=1e-6)
    assert logits.grad[0, 0].tolist() == [0.0, 0.0, 0.0]
    assert logits.grad[0, 1].tolist() == pytest.approx([-w * k * 0.5, w * k * 0.7, -w * k * 0.2], abs=1e-6)


def test_top_k_sampling_with_the_sampled_estimator_is_refused(make_cfg):
    # The audit's example: with top-2 sampling the expected gradient of one token was 0.0116, the exact 0.1202;
    # no weight can recover mass that is never sampled.
    with pytest.raises(ConfigError, match="method.top_k.*method.divergence=reverse_kl"):
        validate(make_cfg("method=on_policy_cd", "method.divergence=sampled_reverse_kl", "method.top_k=2"))
    validate(make_cfg("method=on_policy_cd", "method.divergence=reverse_kl", "method.top_k=2"))


def test_top_k_sampling_never_leaves_the_top_k():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]]).repeat(500, 1)
    picked = pick_tokens(logits, 1.0, 2, torch.Generator().manual_seed(0))
    assert set(picked.tolist()) == {0, 1}
    assert pick_tokens(logits, 0.0, None, None).unique().tolist() == [0]


@pytest.fixture(scope="module")
def tiny(request):
    from hydra import compose, initialize_config_dir

    from ctxdistill.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, "method=on_policy_cd", "output_dir=unused"])
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    return cfg, tokenizer


def test_sampling_is_seeded_and_reproducible_and_greedy_decoding_matches_transformers(tiny):
    cfg, tokenizer = tiny
    model = load_model(cfg.model, cfg.cache_dir, tokenizer, seed=0)
    prompts = ["Review: The food was great.\nSentiment:", "Review: Bad.\nSentiment:"]

    def sample(seed):
        return generate(
            model, tokenizer, prompts, 6, temperature=1.0, stop=None, generator=torch.Generator().manual_seed(seed)
        )

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)
    greedy = generate(model, tokenizer, prompts, 6, stop=None)
    reference = model.generate(
        **tokenizer(prompts, return_tensors="pt", padding=True),
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    assert greedy == reference[:, -6:].tolist()
    shared = ["Context shared by both. " + p for p in prompts]
    with_prefix = generate(model, tokenizer, shared, 6, stop=None, prefix=SharedPrefix(model, tokenizer, shared))
    assert with_prefix == generate(model, tokenizer, shared, 6, stop=None)


def test_on_policy_losses_are_reproducible_and_lambda_picks_who_samples(tiny):
    cfg, tokenizer = tiny
    task = build_task(cfg.dataset, cfg.seed)

    def losses(**overrides):
        method = instantiate({**cfg.method, **overrides}, _convert_="all")
        model = add_lora(load_model(cfg.model, cfg.cache_dir, tokenizer, seed=0), cfg.model)
        handle = ModelHandle(student=model, base=model)
        method.prepare(handle, tokenizer, task, task.train_queries, 8)
        batch = method.collate(tokenizer, task, task.train_queries[:4])
        return [
            (round(loss.item(), 6), extra["on_policy"])
            for loss, extra in (method.loss(handle, batch) for _ in range(2))
        ]

    first = losses()
    assert first == losses() and all(on for _, on in first)
    assert all(not on for _, on in losses(lmbda=0.0))
    assert first != losses(seed=1)


@pytest.mark.parametrize("divergence", ["reverse_kl", "sampled_reverse_kl"])
def test_on_policy_cd_through_the_shared_trainer_moves_the_student_towards_the_teacher(make_cfg, tmp_path, divergence):
    before = run(make_cfg(*TINY, "method=zero_shot", output_dir=tmp_path / "zero_shot"))["metrics"]
    result = run(
        make_cfg(
            *TINY,
            "method=on_policy_cd",
            f"method.divergence={divergence}",
            "method.lmbda=0.5",
            "method.temperature=0.7",
            "trainer.max_steps=12",
            "trainer.lr=1e-2",
            output_dir=tmp_path / divergence,
        )
    )
    assert result["train"]["steps"] == 12 and math.isfinite(result["train"]["final_loss"])
    assert (tmp_path / divergence / "adapter" / "adapter_config.json").is_file()
    assert result["metrics"]["eval/kl_to_teacher"] < 0.8 * before["eval/kl_to_teacher"]


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd"])
def test_with_one_sampled_token_on_policy_distillation_is_cd_at_the_label_position(tiny, divergence):
    """The first sampled position is the one that predicts the label word, and a full-vocabulary divergence
    there does not depend on the sample: on-policy distillation of one token is cd (the demo's explanation)."""
    from ctxdistill.methods.distill import DistillConfig
    from ctxdistill.methods.on_policy import OnPolicyConfig

    from conftest import method_of

    cfg, tokenizer = tiny
    task = build_task(cfg.dataset, cfg.seed)
    model = add_lora(load_model(cfg.model, cfg.cache_dir, tokenizer, seed=0), cfg.model)
    torch.manual_seed(0)
    for name, weight in model.named_parameters():
        if "lora_B" in name:  # a student that differs from its teacher
            torch.nn.init.normal_(weight, std=0.5)
    handle = ModelHandle(student=model, base=model)
    queries = task.train_queries[:4]
    losses = []
    for method in (
        method_of(OnPolicyConfig, name="on_policy_cd", divergence=divergence, max_new_tokens=1),
        method_of(DistillConfig, name="cd", divergence=divergence, teacher_cache="memory"),
    ):
        method.prepare(handle, tokenizer, task, queries, 4)
        losses.append(method.loss(handle, method.collate(tokenizer, task, queries))[0].item())
    assert losses[0] > 1e-3  # far above float noise (the JSD is the smallest of the three here)
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


@pytest.mark.parametrize("adds_bos", [False, True], ids=["no BOS (SmolLM2)", "BOS (Gemma, OPT, Llama)"])
def test_a_trainable_context_initialised_from_the_whole_context_is_the_teacher(tiny, adds_bos, tmp_path):
    """The teacher reads one BOS, at the head of its prompt: with a tokenizer that adds it to every text, the
    prefix holds it and each query's own is masked out, so the student's logits are still the teacher's."""
    cfg, tokenizer = tiny
    tokenizer = with_bos(tokenizer) if adds_bos else tokenizer
    model = load_model(cfg.model, cfg.cache_dir, tokenizer, seed=0).eval()
    context = "Answer foo if positive, bar if negative."
    queries = ["\nReview: The food was great.\nSentiment:", "\nReview: Bad.\nSentiment:"]
    skip = int(adds_bos)
    assert all(
        tokenizer(context + q).input_ids == tokenizer(context).input_ids + tokenizer(q).input_ids[skip:]
        for q in queries
    )
    student = TrainableContext.from_text(model, tokenizer, context, num_tokens=1000)
    assert student.query_bos_token_id == (tokenizer.bos_token_id if adds_bos else None)
    assert student.num_tokens == len(tokenizer(context).input_ids)
    answers = [tokenizer(" foo bar", add_special_tokens=False).input_ids] * 2
    with torch.no_grad():
        expected = answer_logits(model, encode(tokenizer, [context + q for q in queries], answers))
        torch.testing.assert_close(
            answer_logits(student, encode(tokenizer, queries, answers)), expected, atol=1e-4, rtol=1e-4
        )
        shared = SharedPrefix(student, tokenizer, queries)  # the student's own shared-prefix cache on top
        batch = encode(tokenizer, queries, answers, prefix_length=shared.length)
        torch.testing.assert_close(answer_logits(student, batch, shared), expected, atol=1e-4, rtol=1e-4)
        assert generate(student, tokenizer, queries, 5, stop=None) == generate(
            model, tokenizer, [context + q for q in queries], 5, stop=None
        )
        unbatched = student(input_ids=torch.tensor([tokenizer(queries[1]).input_ids])).logits[0, -1]
        torch.testing.assert_close(unbatched, expected[1, -2], atol=1e-4, rtol=1e-4)  # positions inferred
        if adds_bos:
            without_bos = torch.tensor([tokenizer(queries[1], add_special_tokens=False).input_ids])
            with pytest.raises(ValueError, match="must start with the BOS token"):
                student(input_ids=without_bos)
        with student.disable_adapter():
            torch.testing.assert_close(
                answer_logits(student, encode(tokenizer, queries, answers)),
                answer_logits(model, encode(tokenizer, queries, answers)),
            )
    loss = answer_logits(student, encode(tokenizer, queries, answers)).logsumexp(-1).sum()
    loss.backward()
    assert student.keys.grad.abs().sum() > 0 and student.values.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    student.save_pretrained(tmp_path)
    assert TrainableContext.from_saved(model, tmp_path).query_bos_token_id == student.query_bos_token_id


def test_distillation_into_a_trainable_context_saves_it(make_cfg, tmp_path):
    result = run(make_cfg(*TINY, "method=cd", "model.adapter=prefix", "model.prefix_tokens=8", "trainer.max_steps=2"))
    assert result["train"]["steps"] == 2
    assert (tmp_path / "adapter" / "trainable_context.pt").is_file()


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd"])
def test_with_an_empty_context_the_teacher_is_the_student_and_every_divergence_is_zero(tiny, divergence):
    cfg, tokenizer = tiny
    spec = cfg.dataset.copy()
    spec.context.instruction, spec.context.num_demos = "", 0
    task = build_task(spec, cfg.seed)
    assert task.teacher_prompt(task.train_queries[0]) == task.student_prompt(task.train_queries[0])
    method = instantiate({**cfg.method, "divergence": divergence}, _convert_="all")
    model = add_lora(load_model(cfg.model, cfg.cache_dir, tokenizer, seed=0), cfg.model)  # LoRA starts as identity
    handle = ModelHandle(student=model, base=model)
    method.prepare(handle, tokenizer, task, task.train_queries, 8)
    with torch.no_grad():
        loss, _ = method.loss(handle, method.collate(tokenizer, task, task.train_queries[:4]))
    assert loss.item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("hybrid, lmbda, crossentropy_weight", [(False, 1.0, 0.0), (True, 1.0, 0.0), (False, 0.0, 0.5)])
def test_gold_on_policy_with_another_tokenizer_equals_plain_forwards(
    make_cfg, behaving_model_dir, monkeypatch, hybrid, lmbda, crossentropy_weight
):
    """The tiny student (SmolLM2's tokenizer) samples (or with lmbda=0 the behaving teacher, in its own 264
    tokens, after the context); the teacher scores each sample written in its tokens, after the context. At the
    first step, every row's inputs to the distance (the student's and the teacher's distributions and token
    log-probabilities at the aligned positions), the cross-entropy and the loss equal those recomputed row by row
    from plain forwards of each whole prompt and sample, without padding, batching or the shared context cache;
    every aligned group of positions writes the same text on both sides."""
    from ctxdistill.encoding import retokenized, tokenization_groups
    from ctxdistill.losses import uld_distance, uld_teacher_targets
    from ctxdistill.methods import on_policy
    from ctxdistill.methods.on_policy import OnPolicyDistillation

    cfg = make_cfg(
        *TINY,
        "method=on_policy_cd",
        "method.divergence=uld",
        f"method.uld_hybrid={hybrid}",
        f"method.lmbda={lmbda}",
        f"method.uld_crossentropy_weight={crossentropy_weight}",
        *behaving_teacher_overrides(behaving_model_dir),
        "dataset.num_train_queries=8",
        "dataset.source.split_sizes.eval=16",
        "trainer.batch_size=4",
        "trainer.max_steps=2",
    )
    checked, rows = [], []
    original_loss, original_sample = OnPolicyDistillation.loss, OnPolicyDistillation.sample

    def sampling(self, model, prompts, prefix=None, tokenizer=None):
        self.last_samples = original_sample(self, model, prompts, prefix, tokenizer)
        self.sampled_by_teacher = tokenizer is self.teacher_tokenizer
        return self.last_samples

    def recording_distance(*args, **kwargs):
        rows.append([a.detach().clone() if torch.is_tensor(a) else a for a in args])
        return uld_distance(*args, **kwargs)

    def checking(self, handle, batch):
        rows.clear()
        loss, stats = original_loss(self, handle, batch)
        if checked:
            return loss, stats
        assert stats["on_policy"] == lmbda and self.sampled_by_teacher == (lmbda == 0)
        shared = self._shared or (None, None)
        distances, aligned, token_losses = [], iter(rows), []
        with torch.no_grad(), handle.teacher() as frozen:
            for prompt, teacher_prompt, sampled in zip(
                batch["student_prompts"], batch["teacher_prompts"], self.last_samples
            ):
                if self.sampled_by_teacher:
                    span, sample = sampled, retokenized(self.teacher_tokenizer, sampled, self.tokenizer)
                else:
                    sample, span = sampled, retokenized(self.tokenizer, sampled, self.teacher_tokenizer)
                ids = self.tokenizer(prompt).input_ids + sample
                probs = (
                    handle.student(torch.tensor([ids])).logits[0, len(ids) - len(sample) - 1 : -1].float().softmax(-1)
                )
                token_losses += (-probs.gather(-1, torch.tensor(sample).unsqueeze(-1)).log()).flatten().tolist()
                groups = tokenization_groups(self.tokenizer, sample, self.teacher_tokenizer, span)
                for student_positions, teacher_positions in groups:
                    written = self.tokenizer.decode([sample[i] for i in student_positions])
                    assert written == self.teacher_tokenizer.decode([span[i] for i in teacher_positions])
                if not groups:
                    continue
                teacher_ids = self.teacher_tokenizer(teacher_prompt).input_ids + span
                teacher_logits = frozen(torch.tensor([teacher_ids])).logits[0, len(teacher_ids) - len(span) - 1 : -1]
                reference = [
                    probs,
                    probs.gather(-1, torch.tensor(sample).unsqueeze(-1)).squeeze(-1),
                    groups,
                    *uld_teacher_targets(teacher_logits, torch.tensor(span), shared_ids=shared[1]),
                ]
                for got, expected in zip(next(aligned), reference):
                    if torch.is_tensor(expected):
                        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
                    else:
                        assert got == expected
                distance, _, _ = uld_distance(
                    *reference, student_shared_ids=shared[0], weights=self._hybrid_weights or (0.0, 1.0), beta=self.beta
                )
                distances.append(distance)
        assert len(distances) == len(rows) == stats["aligned_rows"] * len(self.last_samples) >= 2
        crossentropy = sum(token_losses) / len(token_losses)
        assert stats["uld_crossentropy"] == pytest.approx(crossentropy, rel=1e-4)
        expected = torch.stack(distances).mean().item() + crossentropy_weight * crossentropy
        assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert ("uld_shared_jsd" in stats) == hybrid
        checked.append(stats)
        return loss, stats

    monkeypatch.setattr(OnPolicyDistillation, "sample", sampling)
    monkeypatch.setattr(OnPolicyDistillation, "loss", checking)
    monkeypatch.setattr(on_policy, "uld_distance", recording_distance)
    result = run(cfg)
    assert checked and result["metrics"]["eval/accuracy"] is not None


def test_gold_settings_are_checked_before_anything_loads(make_cfg):
    base = [*TINY, "method=on_policy_cd"]
    with pytest.raises(ConfigError, match=r"method.uld_crossentropy_weight: weights a term of divergence=uld only"):
        validate(make_cfg(*base, "method.uld_crossentropy_weight=1.0"))
    with pytest.raises(ConfigError, match="method.uld_crossentropy_weight: must be non-negative"):
        validate(make_cfg(*base, "method.divergence=uld", "method.uld_crossentropy_weight=-1"))
    with pytest.raises(ConfigError, match="method.uld_hybrid: is a variant of divergence=uld"):
        validate(make_cfg(*base, "method.uld_hybrid=true"))
    with pytest.raises(ConfigError, match="a teacher predicts the next token"):
        validate(make_cfg(*base, "+model@method.teacher_model=minilm-l6"))


def test_a_teacher_with_another_vocabulary_needs_gold(make_cfg):
    from ctxdistill.models import ModelLoadError

    cfg = make_cfg(*TINY, "method=on_policy_cd", "+model@method.teacher_model=minilm-l6")
    method = instantiate(cfg.method, _convert_="all")
    task = build_task(cfg.dataset, cfg.seed)
    student, bert = load_tokenizer(cfg.model, cfg.cache_dir), load_tokenizer(cfg.method.teacher_model, cfg.cache_dir)
    with pytest.raises(ModelLoadError, match="different vocabularies.*method.divergence=uld"):
        method.check_teacher(cfg, task, student, bert)
    method.uld = True
    method.check_teacher(cfg, task, student, bert)  # ULD meets any tokenizer on text


def test_the_samples_count_in_the_teachers_window_before_the_model_loads(make_cfg):
    """The check left one token for the answer: a teacher prompt one short of the window passed, and every teacher
    row then ran max_new_tokens past it (an index error on learned positions, unseen positions under RoPE)."""
    from ctxdistill.methods import build_method

    cfg = make_cfg(*TINY, "method=on_policy_cd", "method.max_new_tokens=16")
    method, tokenizer = build_method(cfg.method), load_tokenizer(cfg.model, cfg.cache_dir)
    task = method.build_task(cfg.dataset, cfg.seed)
    prompts = [task.teacher_prompt(e) for e in [*task.train_queries, *task.eval_sets["eval"]]]
    longest = max(len(ids) for ids in tokenizer(prompts).input_ids)
    cfg.model.max_length = longest + 2
    with pytest.raises(ConfigError, match=rf"up to {longest} tokens \(\+16 for the answer\)"):
        method.check_inputs(task, tokenizer, cfg)
    cfg.model.max_length = longest + 16
    method.check_inputs(task, tokenizer, cfg)


@pytest.mark.parametrize("lmbda", [1.0, 0.0])
def test_gold_trains_on_where_a_sample_ends_at_once(make_cfg, behaving_model_dir, monkeypatch, lmbda):
    """A sample that is only its end of text writes nothing the other tokenizer can spell: encoding it failed
    ("every answer needs at least one token") and stopped the run, where a long run's first token is sometimes
    the end. It stands for the other tokenizer's end of text."""
    from ctxdistill.methods.on_policy import OnPolicyDistillation

    original = OnPolicyDistillation.sample
    ended = []

    def ending_at_once(self, model, prompts, prefix=None, tokenizer=None):
        samples = original(self, model, prompts, prefix, tokenizer)
        ended.append((tokenizer or self.tokenizer).eos_token_id)
        return [[ended[-1]], *samples[1:]]

    monkeypatch.setattr(OnPolicyDistillation, "sample", ending_at_once)
    cfg = make_cfg(
        *TINY,
        "method=on_policy_cd",
        "method.divergence=uld",
        f"method.lmbda={lmbda}",
        *behaving_teacher_overrides(behaving_model_dir),
        "dataset.num_train_queries=8",
        "dataset.source.split_sizes.eval=16",
        "trainer.batch_size=4",
        "trainer.max_steps=2",
    )
    result = run(cfg)
    assert len(ended) == 2 and math.isfinite(result["train"]["final_loss"])
