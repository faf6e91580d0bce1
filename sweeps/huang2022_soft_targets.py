"""Why ICL-D trails ICT offline: what the soft (teacher) term asks of the student at the answer position.

    python sweeps/huang2022_soft_targets.py [--per-task N] [Hydra overrides ...]

Composes ``experiment=huang2022/multitask_ict method=icl_d`` (plus the overrides), takes the first N training
prompts of each task and runs the frozen teacher and the untrained student on them, as ICL-D's first step sees
them. Per task it prints the teacher's accuracy on its own soft labels, its probability of the gold answer word
among the answer words, the mass it gives the answer words at all, and how the soft term KL(p_T || p_S) splits
(chain rule) into the choice between the answer words, answer words vs the rest, and the rest of the vocabulary;
the share of the soft term's gradient (on the student's logits: p_S - p_T) that falls on the answer words; and the
gold answer's share of the answer words at the ICL objective's optimum, (w_hard * onehot + w_soft * p_T) /
(w_hard + w_soft) at T = 1, which ICT (w_soft = 0) would push to 1. ``--temperatures`` repeats the table at other T
from the same logits.
"""

from __future__ import annotations

import argparse

import torch
from hydra import compose, initialize_config_dir

from ctxdistill.cli import CONFIG_DIR, exit_with_message, user_errors
from ctxdistill.config import validate
from ctxdistill.data.mixture import build_mixture
from ctxdistill.encoding import answer_logits
from ctxdistill.methods import build_method
from ctxdistill.models import load_model, load_tokenizer


def kl_parts(teacher: torch.Tensor, student: torch.Tensor, words: torch.Tensor) -> dict[str, torch.Tensor]:
    """KL(p_T || p_S) per row [B] of log-probabilities [B, V], split by the chain rule over {answer words, rest}:
    the binary KL of the answer words' total mass, + p_T(words) * KL within the words, + p_T(rest) * KL within
    the rest. The parts sum to the whole (checked)."""
    inside = torch.zeros(teacher.shape[-1], dtype=torch.bool)
    inside[words] = True
    parts = {"kl": (teacher.exp() * (teacher - student)).sum(-1)}
    mass_t, mass_s = {}, {}
    for name, where in (("words", inside), ("rest", ~inside)):
        t, s = teacher[:, where], student[:, where]
        mass_t[name], mass_s[name] = t.logsumexp(-1), s.logsumexp(-1)
        t_in, s_in = t - mass_t[name][:, None], s - mass_s[name][:, None]
        parts[f"kl_within_{name}"] = mass_t[name].exp() * (t_in.exp() * (t_in - s_in)).sum(-1)
    parts["kl_words_vs_rest"] = sum(mass_t[n].exp() * (mass_t[n] - mass_s[n]) for n in ("words", "rest"))
    total = parts["kl_within_words"] + parts["kl_within_rest"] + parts["kl_words_vs_rest"]
    torch.testing.assert_close(total, parts["kl"], rtol=1e-3, atol=1e-3)
    return parts


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-task", type=int, default=8, help="training prompts per task")
    parser.add_argument("--temperatures", type=float, nargs="+", help="soft-label temperatures (default: the method's)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["experiment=huang2022/multitask_ict", "method=icl_d", "output_dir=unused", *args.overrides],
        )
    validate(cfg)  # before the models load
    mixture = build_mixture(cfg.dataset, cfg.seed)
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    student = load_model(cfg.model, cfg.cache_dir, tokenizer, seed=cfg.seed).eval()
    teacher = load_model(cfg.method.teacher, cfg.cache_dir, tokenizer, seed=cfg.seed).eval()
    method = build_method(cfg.method)
    w_hard, w_soft = cfg.method.icl_hard_weight, cfg.method.icl_soft_weight
    print(f"teacher {cfg.method.teacher.name}, student {cfg.model.name}, weights hard {w_hard} soft {w_soft}")
    columns = [
        "task",
        "teacher acc",
        "teacher gold share of words",
        "teacher p(words)",
        "student p(words)",
        "soft KL",
        "of which: words vs rest",
        "within rest",
        "within words",
        "soft grad on words",
        "ICL-D optimum gold share",
    ]
    logits = {}
    for name, part in mixture.train_tasks.items():
        examples = part.train_queries[: args.per_task]
        words = [tokenizer(v, add_special_tokens=False).input_ids for v in part.verbalizers]
        if any(len(w) != 1 for w in words):
            raise SystemExit(f"task {name}: answer words {part.verbalizers} are not single tokens")
        words = torch.tensor([w[0] for w in words])
        batch = method.encode_instances(tokenizer, mixture, examples, demonstrations=False)
        labels = torch.tensor([e.label for e in examples])
        logits[name] = (words, labels, answer_logits(teacher, batch)[:, -1], answer_logits(student, batch)[:, -1])
    for T in args.temperatures or [cfg.method.temperature]:
        print(f"\nT = {T}\n\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
        for name, (words, labels, teacher_logits, student_logits) in logits.items():
            row = soft_term(words, labels, teacher_logits, student_logits, T, w_hard, w_soft)
            print(f"| {name} | " + " | ".join(f"{c:.3f}" for c in row) + " |")


def soft_term(
    words: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    T: float,
    w_hard: float,
    w_soft: float,
) -> list[float]:
    """One task's row of the table (see the module docstring)."""
    t = (teacher_logits / T).log_softmax(-1)
    s = (student_logits / T).log_softmax(-1)
    gold = words[labels]
    parts = kl_parts(t, s, words)
    grad = s.exp() - t.exp()  # d KL(p_T || p_S) / d student logits, at temperature T
    on_words = (grad[:, words] ** 2).sum(-1) / (grad**2).sum(-1)
    p_gold, p_words = t.exp().gather(1, gold[:, None])[:, 0], t.exp()[:, words].sum(-1)
    # the ICL objective's optimum at T = 1: p* = (w_hard * onehot(gold) + w_soft * p_T) / (w_hard + w_soft)
    optimum = (w_hard + w_soft * p_gold) / (w_hard + w_soft * p_words) if T == 1 else torch.tensor(float("nan"))
    cells = [
        (t[:, words].argmax(-1) == labels).float().mean(),
        (p_gold / p_words).mean(),
        p_words.mean(),
        s.exp()[:, words].sum(-1).mean(),
        parts["kl"].mean(),
        parts["kl_words_vs_rest"].mean(),
        parts["kl_within_rest"].mean(),
        parts["kl_within_words"].mean(),
        on_words.mean(),
        optimum.mean(),
    ]
    return [c.item() for c in cells]


if __name__ == "__main__":
    try:
        main()
    except user_errors() as e:  # a misspelt override, a missing file: its message; a real bug keeps its traceback
        exit_with_message(e)
