"""In-context learning distillation (Huang et al. 2022): loss terms by hand, the frozen separate teacher,
task mixtures with per-prompt demonstrations, majority vote, Meta-ICT's unseen tasks, layer-dropped students."""

import json
import math

import pytest
import torch
from hydra.utils import instantiate

from ctxdistill.config import ConfigError, validate
from ctxdistill.data.mixture import build_mixture
from ctxdistill.data.tasks import DataError
from ctxdistill.evaluation import Scores, majority_vote
from ctxdistill.methods.icl_distill import icl_distillation_loss
from ctxdistill.models import ModelHandle, ModelLoadError, load_model, load_tokenizer
from ctxdistill.run import run

# A 4-layer tiny teacher and the student made from it with every other layer kept, on small mixtures.
STUDENT_ON_MIXTURE = [
    "experiment=huang2022/multitask_ict",
    "model=tiny-random",
    "model.tiny.num_hidden_layers=4",
    "model.layer_stride=2",
    "logger=none",
    "dataset.num_demos=4",
    "dataset.pool_size=8",
    "dataset.num_train_instances=16",
    "dataset.num_eval=6",
    "dataset.num_votes=3",
    "trainer.epochs=1",
    "trainer.eval_batch_size=32",
]
MIXTURE = [
    *STUDENT_ON_MIXTURE,
    "model@method.teacher=tiny-random",
    "method.teacher.tiny.num_hidden_layers=4",
    "method.teacher_cache=memory",
]


def hand_batch(k: int = 4) -> dict:
    """One prompt: a one-token answer (gold token 1) and two demonstration positions, the second masked out.
    The teacher's top-k covers the whole 4-token vocabulary, so its rest bucket is empty."""
    indices = torch.arange(k).expand(1, 1, k)
    return {
        "answer_ids": torch.tensor([[1]]),
        "answer_mask": torch.tensor([[True]]),
        "lm_ids": torch.tensor([[3, 0]]),
        "lm_mask": torch.tensor([[True, False]]),
        "teacher_answer_logprobs": torch.tensor([[[0.5, 0.25, 0.125, 0.125]]]).log(),
        "teacher_answer_indices": indices,
        "teacher_lm_logprobs": torch.tensor([[[0.4, 0.3, 0.2, 0.1], [0.25] * 4]]).log(),
        "teacher_lm_indices": indices.expand(1, 2, k),
    }


UNIFORM = torch.zeros(1, 1, 4)  # the student's answer logits: p = 1/4 for each token
LM = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [9.0, 1.0, 1.0, 1.0]]]).log()  # the second row is masked out


def test_each_term_matches_its_hand_computed_value():
    weights = {"icl_hard": 0.5, "icl_soft": 0.25, "lm_hard": 2.0, "lm_soft": 1.0}
    loss, terms = icl_distillation_loss(UNIFORM, LM, hand_batch(), weights, temperature=1.0)
    icl_hard = math.log(4)  # -log 1/4
    icl_soft = 0.5 * math.log(2) + 0.25 * 0 + 2 * 0.125 * math.log(0.5)  # sum p_T log(p_T / (1/4))
    lm_hard = -math.log(0.4)  # gold token 3; the masked position does not count
    lm_soft = 0.4 * math.log(4) + 0.3 * math.log(1.5) + 0.2 * math.log(2 / 3) + 0.1 * math.log(0.25)
    assert terms == pytest.approx(
        {"icl_hard": icl_hard, "icl_soft": icl_soft, "lm_hard": lm_hard, "lm_soft": lm_soft}, abs=1e-5
    )
    assert loss.item() == pytest.approx(0.5 * icl_hard + 0.25 * icl_soft + 2 * lm_hard + lm_soft, abs=1e-5)


def test_soft_terms_are_scaled_by_the_squared_temperature():
    # A uniform student stays uniform at T=2, so the KL at T=2 is the hand-computed one above, times T^2.
    _, terms = icl_distillation_loss(
        UNIFORM, None, hand_batch(), {"icl_hard": 0, "icl_soft": 1, "lm_hard": 0, "lm_soft": 0}, temperature=2.0
    )
    assert terms == pytest.approx({"icl_soft": 4 * 0.25 * math.log(2)}, abs=1e-5)


def test_a_zero_weight_switches_its_term_off():
    _, terms = icl_distillation_loss(
        UNIFORM,
        None,
        {"answer_ids": torch.tensor([[1]]), "answer_mask": torch.tensor([[True]])},
        {"icl_hard": 1, "icl_soft": 0, "lm_hard": 0, "lm_soft": 0},
        1.0,
    )
    assert terms == pytest.approx({"icl_hard": math.log(4)})  # ICT: no teacher target is needed at all


@pytest.fixture
def prepared(make_cfg):
    """The method with its teacher's targets, a handle on the separate teacher and the layer-dropped student."""
    cfg = make_cfg(*MIXTURE)
    validate(cfg)
    method = instantiate(cfg.method, _convert_="all")
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    task = method.build_task(cfg.dataset, cfg.seed)
    student = load_model(cfg.model, cfg.cache_dir, tokenizer, cfg.seed)
    teacher = load_model(method.teacher_model, cfg.cache_dir, tokenizer, cfg.seed).requires_grad_(False)
    handle = ModelHandle(student=student, base=student, separate_teacher=teacher)
    examples = method.train_examples(task)
    method.prepare(handle, tokenizer, task, examples, batch_size=8)
    return method, handle, tokenizer, task, examples


def test_the_teacher_runs_once_before_training_and_gets_no_gradient(prepared):
    method, handle, tokenizer, task, examples = prepared
    assert method.teacher_forwards == 2  # 16 instances in batches of 8, before any step
    teacher_before = {k: v.clone() for k, v in handle.separate_teacher.state_dict().items()}
    optimizer = torch.optim.SGD(handle.student.parameters(), lr=0.1)
    for _ in range(2):
        loss, terms = method.loss(handle, method.collate(tokenizer, task, examples[:4]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert set(terms) == {"icl_hard", "icl_soft", "lm_hard", "lm_soft"} and method.teacher_forwards == 2
    assert all(p.grad is None and not p.requires_grad for p in handle.separate_teacher.parameters())
    for key, value in handle.separate_teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key])


def test_a_second_run_on_the_same_prompts_reads_the_teachers_targets_from_disk(make_cfg, tmp_path):
    def train(name, *overrides):
        return run(
            make_cfg(
                *MIXTURE,
                "method.teacher_cache=disk",
                f"method.teacher_cache_dir={tmp_path / 'targets'}",
                "trainer.max_steps=2",
                *overrides,
                output_dir=tmp_path / name,
            )
        )["train"]

    first, again = train("first"), train("again")
    assert first["teacher_forwards"] == 1 and again["teacher_forwards"] == 0
    assert again["final_loss"] == pytest.approx(first["final_loss"], abs=1e-6)
    # ICL-D needs only the answer targets that ICL-D(LM) stored; another temperature needs new ones
    assert train("icl_d", "method=icl_d")["teacher_forwards"] == 0
    assert train("hotter", "method.temperature=2.0")["teacher_forwards"] == 1
    # the sixteenth audit: the same text split otherwise between prompt and answer ("Sentiment:\n" + "foo" against
    # "Sentiment:" + "\nfoo") has other answer tokens, and read the first one's targets
    sentiment = "dataset.train_tasks.sentiment"
    newline_in_prompt = [
        f'{sentiment}.verbalizers=["foo","bar"]',
        f'{sentiment}.template="Review: {{review}}\nSentiment:\n"',
    ]
    assert train("newline_in_prompt", *newline_in_prompt)["teacher_forwards"] >= 1
    assert train("newline_in_answer", f'{sentiment}.verbalizers=["\nfoo","\nbar"]')["teacher_forwards"] >= 1


def test_the_lm_objective_reads_exactly_the_demonstration_tokens(prepared):
    method, handle, tokenizer, task, examples = prepared
    batch = method.encode_instances(tokenizer, task, examples[:3], demonstrations=True)
    for row, example in enumerate(examples[:3]):
        part = task.task_of(example)
        context = part.context_of(example)
        ids = batch["lm_ids"][row][batch["lm_mask"][row]].tolist()
        assert tokenizer.decode(ids) == context[part.demo_sampler.instruction_chars :]  # no instruction, no query
        # each column holds the token before the one it predicts
        columns = batch["lm_columns"][row][batch["lm_mask"][row]]
        assert batch["input_ids"][row, columns + 1].tolist() == ids


def test_a_top_k_of_the_whole_vocabulary_distils_the_full_distributions(make_cfg):
    """Every term against plain forward passes of each whole prompt + answer, unpadded, at T = 2: with a top_k
    past the vocabulary the teacher keeps every token, so the soft terms are the exact T^2 * KL(p_T || p_S)."""
    cfg = make_cfg(*MIXTURE, "method.top_k=1000000", "method.temperature=2.0")
    method = instantiate(cfg.method, _convert_="all")
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    task = method.build_task(cfg.dataset, cfg.seed)
    student = load_model(cfg.model, cfg.cache_dir, tokenizer, cfg.seed).eval()
    teacher = load_model(method.teacher_model, cfg.cache_dir, tokenizer, cfg.seed).requires_grad_(False)
    examples = method.train_examples(task)[:3]
    method.prepare(ModelHandle(student=student, base=student, separate_teacher=teacher), tokenizer, task, examples, 8)
    with torch.no_grad():
        _, terms = method.loss(ModelHandle(student=student, base=student), method.collate(tokenizer, task, examples))

    reference: dict[str, list[float]] = {name: [] for name in terms}
    for example in examples:
        part = task.task_of(example)
        prompt, context = part.teacher_prompt(example), part.context_of(example)
        prompt_ids = tokenizer(prompt).input_ids
        answer_ids = tokenizer(part.answer_text(example), add_special_tokens=False).input_ids
        ids = torch.tensor([prompt_ids + answer_ids])
        with torch.no_grad():
            s, t = student(input_ids=ids).logits[0].float(), teacher(input_ids=ids).logits[0].float()
        offsets = tokenizer(prompt, return_offsets_mapping=True).offset_mapping
        start = part.demo_sampler.instruction_chars
        demo = [j for j, (a, b) in enumerate(offsets) if j > 0 and a < b and a >= start and b <= len(context)]
        for kind, positions, targets in (
            ("icl", range(len(prompt_ids) - 1, ids.shape[1] - 1), answer_ids),
            ("lm", [j - 1 for j in demo], [prompt_ids[j] for j in demo]),
        ):
            positions = list(positions)
            reference[f"{kind}_hard"] += torch.nn.functional.cross_entropy(
                s[positions], torch.tensor(targets), reduction="none"
            ).tolist()
            t_logp, s_logp = (t[positions] / 2).log_softmax(-1), (s[positions] / 2).log_softmax(-1)
            reference[f"{kind}_soft"] += (4 * (t_logp.exp() * (t_logp - s_logp)).sum(-1)).tolist()
    assert terms == pytest.approx({name: sum(v) / len(v) for name, v in reference.items()}, rel=1e-3, abs=1e-6)


def test_every_prompt_draws_its_own_demonstrations_without_its_query(prepared):
    method, handle, tokenizer, task, examples = prepared
    part = task.train_tasks["sentiment"]
    pool_texts = {d.uid: part.query(d) for d in part.demos}
    contexts = set()
    for example in part.train_queries:
        context = part.context_of(example)
        assert context == part.context_of(example)  # the same prompt in every epoch
        assert part.query(example) not in context  # a query is never its own demonstration
        assert sum(text in context for text in pool_texts.values()) == 4
        contexts.add(context)
    assert len(contexts) == len(part.train_queries)


@pytest.mark.parametrize("dataset", ["synthetic_mixture", "synthetic_meta"])
def test_the_held_out_queries_are_the_same_for_every_seed_and_pool_and_balanced(make_cfg, dataset):
    """They were drawn with the random stream that drew the pool, seeded by the run: seeds 0 and 1 shared 96 of
    256 queries, a pool of 16 and one of 32 evaluated on other queries, and a task could get 40 of one label."""
    from ctxdistill.data.mixture import build_mixture

    def held_out(seed: int, *overrides: str) -> list[tuple[str, int]]:
        mixture = build_mixture(make_cfg(f"dataset={dataset}", *overrides).dataset, seed)
        return [(e.uid, e.label) for e in mixture.eval_sets["eval"]]

    queries = held_out(0)
    assert held_out(1) == queries == held_out(0, "dataset.pool_size=16")
    assert len(queries) == 64 * (4 if dataset == "synthetic_mixture" else 1)
    assert sum(label for _, label in queries) == len(queries) // 2  # the generated eval splits alternate labels


def test_majority_vote_takes_the_most_common_answer_and_breaks_ties_by_probability():
    # two queries; three draws each, then two draws of a third query that tie
    logprobs = torch.tensor(
        [
            [0.9, 0.1],
            [0.8, 0.2],
            [0.1, 0.9],  # 2 x class 0 -> 0
            [0.4, 0.6],
            [0.45, 0.55],
            [0.9, 0.1],
        ]
    ).log()  # 2 x class 1 -> 1
    voted = majority_vote(Scores(logprobs, None, torch.arange(6.0), torch.arange(6)), votes=3)
    assert voted.predictions.tolist() == [0, 1]
    assert voted.kl_to_teacher.tolist() == [1.0, 4.0] and voted.top_token.tolist() == [0, 3]
    tie = torch.tensor([[0.6, 0.4], [0.1, 0.9]]).log()  # one vote each; class 1 has the higher mean probability
    assert majority_vote(Scores(tie, None, None, torch.zeros(2)), votes=2).predictions.tolist() == [1]


def test_multitask_run_reports_each_task_beside_the_teacher(make_cfg, tmp_path):
    result = run(make_cfg(*MIXTURE, "trainer.max_steps=2"))
    metrics = result["metrics"]
    tasks = ("sentiment", "size", "temperature", "living")
    assert metrics["eval/accuracy"] == pytest.approx(sum(metrics[f"{t}/accuracy"] for t in tasks) / 4)
    assert result["train"]["steps"] == 2 and result["train"]["teacher_forwards"] == 1
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert sorted({r["set"] for r in rows}) == sorted(tasks) and len(rows) == 4 * 6  # one row per query
    for task in tasks:  # each task's figures are its rows' (the voted answers)
        mine = [r for r in rows if r["set"] == task]
        assert metrics[f"{task}/accuracy"] == pytest.approx(sum(r["prediction"] == r["label"] for r in mine) / 6)
        assert metrics[f"{task}/teacher_accuracy"] == pytest.approx(
            sum(r["teacher_prediction"] == r["label"] for r in mine) / 6
        )
        assert metrics[f"{task}/kl_to_teacher"] == pytest.approx(sum(r["kl_to_teacher"] for r in mine) / 6, rel=1e-5)
    assert (tmp_path / "model" / "config.json").is_file()  # the whole student (model.adapter=full)


def test_the_untrained_student_is_evaluated_on_a_mixture_with_icl(make_cfg, tmp_path):
    metrics = run(make_cfg(*STUDENT_ON_MIXTURE, "method=icl"))["metrics"]
    assert metrics["eval/teacher_agreement"] == 1.0  # the untrained model with demonstrations is its own teacher
    with pytest.raises(
        ConfigError,
        match="method=cd runs on datasets of kind classification or generation, and "
        "dataset=synthetic_mixture is of kind mixture",
    ):
        run(make_cfg(*STUDENT_ON_MIXTURE, "method=cd", output_dir=tmp_path / "cd"))


def test_meta_ict_evaluates_only_on_tasks_absent_from_training(make_cfg, tmp_path):
    meta = [o.replace("multitask_ict", "meta_ict") for o in MIXTURE]
    cfg = make_cfg(*meta, "trainer.max_steps=1")
    validate(cfg)
    task = instantiate(cfg.method, _convert_="all").build_task(cfg.dataset, cfg.seed)
    assert set(task.eval_tasks) == {"temperature"} and not set(task.eval_tasks) & set(task.train_tasks)
    trained_on = {t.query(e) for t in task.train_tasks.values() for e in [*t.train_queries, *t.demos]}
    evaluated = task.eval_tasks["temperature"]
    assert not trained_on & {evaluated.query(e) for e in [*evaluated.demos, *evaluated.eval_sets["eval"]]}
    assert all(not t.eval_sets for t in task.train_tasks.values())
    metrics = run(cfg)["metrics"]
    assert {key.split("/")[0] for key in metrics} == {"temperature", "eval", "serving"}  # serving: the run's
    # A target task that is also a source task is refused, under any name, its dataset renamed too.
    for name in ("size", "size_again"):
        with pytest.raises(ConfigError, match="absent from training"):
            validate(make_cfg(*meta, f"+dataset@dataset.eval_tasks.{name}=synthetic_size"))
        with pytest.raises(ConfigError, match="absent from training"):
            renamed = f"dataset.eval_tasks.{name}.name=renamed"
            validate(make_cfg(*meta, f"+dataset@dataset.eval_tasks.{name}=synthetic_size", renamed))


@pytest.mark.parametrize(
    "override, match",
    [
        ("method.teacher=null", "soft \\(distillation\\) terms need a teacher"),
        ("dataset.paradigm=meta", "needs target tasks"),
        ("dataset.pool_size=4", "must exceed dataset.num_demos"),
        # pools of 3 and 2: a query of the second class leaves 1 of its class for 2 balanced demonstrations
        ("dataset.pool_size=5", "a training query of class 1 leaves fewer than the 2 demonstrations"),
        ("+dataset.weights.nope=1.0", "not training tasks"),
        ("model.adapter=prefix", "draws new demonstrations"),
    ],
)
def test_bad_mixture_settings_are_named(make_cfg, override, match):
    with pytest.raises(ConfigError, match=match):
        validate(make_cfg(*MIXTURE, override))


def test_icl_distill_needs_a_mixture(make_cfg):
    with pytest.raises(
        ConfigError, match="method=icl_distill runs on datasets of kind mixture.*huang2022/multitask_ict"
    ):
        validate(make_cfg("method=icl_distill", "model=tiny-random"))


def test_a_teacher_with_another_vocabulary_is_refused_before_training(make_cfg):
    # all-MiniLM-L6-v2's BERT vocabulary against SmolLM2's (read as a causal LM: the roles' architectures fit)
    teacher = ["model@method.teacher=minilm-l6", "method.teacher.architecture=causal_lm"]
    with pytest.raises(ModelLoadError, match="^method.teacher=minilm-l6 and model=.* different vocabularies"):
        run(make_cfg(*STUDENT_ON_MIXTURE, *teacher, "method.teacher_cache=memory"))


def test_sampling_weights_split_the_training_instances(make_cfg):
    cfg = make_cfg(*MIXTURE, "dataset.num_train_instances=30", "+dataset.weights.sentiment=3.0")
    task = instantiate(cfg.method, _convert_="all").build_task(cfg.dataset, cfg.seed)
    assert {name: len(t.train_queries) for name, t in task.train_tasks.items()} == {
        "sentiment": 15,
        "size": 5,
        "temperature": 5,
        "living": 5,
    }


def test_a_layer_dropped_student_keeps_every_other_layer_and_a_working_cache(make_cfg):
    cfg = make_cfg(*MIXTURE)
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    full = load_model(method_teacher := cfg.method.teacher, cfg.cache_dir, tokenizer, 0)
    half = load_model(cfg.model, cfg.cache_dir, tokenizer, 0).eval()
    assert method_teacher.tiny.num_hidden_layers == 4 and half.config.num_hidden_layers == 2
    assert torch.equal(half.model.layers[1].mlp.down_proj.weight, full.model.layers[2].mlp.down_proj.weight)
    ids = torch.tensor([tokenizer("Review: a fine day\nSentiment: foo").input_ids])
    with torch.no_grad():
        whole = half(input_ids=ids).logits[0, -1]
        cache = half(input_ids=ids[:, :-1], use_cache=True).cache
        stepped = half(input_ids=ids[:, -1:], cache=cache).logits[0, -1]
    torch.testing.assert_close(stepped, whole, atol=1e-4, rtol=1e-4)


def test_a_tasks_own_settings_that_a_mixture_sets_for_all_are_named_as_ignored(make_cfg, caplog):
    """The nineteenth audit: a task's own num_demos, num_eval and data_seed in a mixture were taken and ignored,
    more held-out queries than a task has were cut without a word, and a pool larger than a task's split was
    named as dataset.context.num_demos."""
    from ctxdistill.methods import build_method
    from ctxdistill.run import unused_settings

    given = [
        "dataset.train_tasks.size.context.num_demos=4",
        "dataset.train_tasks.size.num_eval=4",
        "dataset.train_tasks.size.context.data_seed=7",
    ]
    cfg = make_cfg("dataset=synthetic_mixture", "method=icl", "model=tiny-random", *given)
    warnings = [e["warning"] for e in unused_settings(build_method(cfg.method), given, cfg.model.adapter, cfg)]
    assert warnings == [
        "a task mixture draws dataset.num_demos demonstrations for every task's prompts: ignoring "
        "dataset.train_tasks.size.context.num_demos",
        "a task mixture evaluates dataset.num_eval held-out queries of every task: ignoring "
        "dataset.train_tasks.size.num_eval",
        "a task mixture draws every task's pool with dataset.data_seed: ignoring "
        "dataset.train_tasks.size.context.data_seed",
    ]
    build_mixture(make_cfg("dataset=synthetic_mixture", "dataset.num_eval=200").dataset, 0)
    assert "dataset.num_eval=200 is more than the 160 examples of task size there are: all are used" in caplog.text
    with pytest.raises(DataError) as refused:
        build_mixture(make_cfg("dataset=synthetic_mixture", "dataset.pool_size=200").dataset, 0)
    assert str(refused.value) == "task size: dataset.pool_size=200 is larger than the training pool (160 examples)"
