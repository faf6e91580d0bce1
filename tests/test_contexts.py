"""Several contexts distilled simultaneously (Snell et al. eq. 2): disjoint demonstrations, one context per example."""

from collections import Counter

from ctxdistill.data import build_task
from ctxdistill.run import run

from conftest import TINY


def test_several_contexts_hold_disjoint_balanced_demonstrations_and_share_the_queries(make_cfg):
    one = build_task(make_cfg(*TINY).dataset, seed=0)
    three = build_task(make_cfg(*TINY, "dataset.context.num_contexts=3").dataset, seed=0)
    assert one.contexts == [one.context] and three.context == one.context  # the first draw is unchanged
    assert len(three.demos) == 3 * len(one.demos) and len({d.uid for d in three.demos}) == len(three.demos)
    for i in range(3):
        labels = Counter(d.label for d in three.demos[i * 12 : (i + 1) * 12])
        assert labels == {0: 6, 1: 6}
    used = Counter(three.contexts.index(three.context_of(q)) for q in three.train_queries)
    assert set(used) == {0, 1, 2} and min(used.values()) >= 4
    query = three.train_queries[0]
    assert three.teacher_prompt(query) == three.context_of(query) + "\n\n" + three.query(query)
    assert not {d.uid for d in three.demos} & {q.uid for q in three.train_queries}


def test_cd_distils_several_contexts_in_one_run(make_cfg):
    result = run(make_cfg(*TINY, "method=cd", "dataset.context.num_contexts=2", "trainer.max_steps=2"))
    assert result["train"]["steps"] == 2 and len(result["demos"]) == 24
