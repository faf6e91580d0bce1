"""Knowledge graphs for link prediction: loaders, a synthetic graph, and per-triple contexts.

Three on-disk layouts (``dataset.source.layout``), all keeping entity ids as strings
(WN18RR's synset ids have leading zeros):

- ``kgbert``: ``train.tsv``/``dev.tsv``/``test.tsv`` with ``head \\t relation \\t tail``,
  ``entity2text.txt`` and ``relation2text.txt`` (``id \\t text``), optionally
  ``entity2textlong.txt`` with longer descriptions (KG-BERT, Contextualization Distillation);
- ``kgs2s``: ``train2id.txt``/``valid2id.txt``/``test2id.txt`` that start with a count line and
  hold ``head tail relation`` integer ids, ``entity2id.txt``/``relation2id.txt`` (count line, then
  ``original id \\t integer id``), ``entityid2name.txt``, ``relationid2name.txt`` and optionally
  ``entityid2description.txt`` (KG-S2S); integer ids are mapped back to the original ids;
- ``plain``: ``train.txt``/``valid.txt``/``test.txt`` with ``head \\t relation \\t tail`` (RotatE),
  where names are the ids themselves unless ``entity2text.txt`` is present.

Contexts (the paragraphs an LLM writes per training triple) live in a JSON-lines file keyed by
triple, which stage 1 (methods.contextualization) rewrites from its cached stage rows; the released
writer's ``knowledge_context.txt`` (a count line, then ``head |**| tail |**| relation |**| text`` with
KG-S2S integer ids) is read as well.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from ctxdistill import provenance
from ctxdistill.data.tasks import DataError
from ctxdistill.stage_cache import JsonLines

log = logging.getLogger(__name__)

Triple = tuple[str, str, str]  # (head, relation, tail), original string ids
SPLITS = ("train", "valid", "test")


@dataclass
class KnowledgeGraph:
    entity_names: dict[str, str]
    entity_descriptions: dict[str, str]
    relation_names: dict[str, str]
    splits: dict[str, list[Triple]]  # train / valid / test

    @property
    def entities(self) -> list[str]:
        return list(self.entity_names)

    def true_triples(self) -> set[Triple]:
        """Every known triple of every split: what filtered ranking leaves out."""
        return {t for triples in self.splits.values() for t in triples}

    def triple_text(self, triple: Triple) -> Optional[str]:
        """``head name | relation text | tail name``, what a context is written about; None for a triple whose
        ids the graph does not know."""
        h, r, t = triple
        if h not in self.entity_names or t not in self.entity_names or r not in self.relation_names:
            return None
        return f"{self.entity_names[h]} | {self.relation_names[r]} | {self.entity_names[t]}"

    def written_about(self, triple: Triple, text: str) -> bool:
        """Whether a context written about ``text`` (a stage-1 row's :meth:`triple_text`) is about ``triple`` here:
        ``text`` is its text, or that with each entity name cut at its first comma. WN18RR's contexts are written
        about bare lemmas (the kgbert layout's names, the released writer's cut of the KG-S2S names), and the
        KG-S2S students read them naming the same entities ``lemma , POS , sense``."""
        own = self.triple_text(triple)
        if own is None:
            return False
        h, r, t = triple
        lemma = {e: self.entity_names[e].split(",")[0].strip() for e in (h, t)}
        return text in (own, f"{lemma[h]} | {self.relation_names[r]} | {lemma[t]}")


# ---------------------------------------------------------------- readers
def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(
            f"knowledge-graph file not found: {path}. Check dataset.source.data_dir and "
            f"dataset.source.layout (kgbert, kgs2s or plain)."
        )
    provenance.note_data_file(path)
    return [line.rstrip("\n").rstrip("\r") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _columns(path: Path, count: int, sep: Optional[str] = "\t", counted: bool = False) -> list[list[str]]:
    """Rows of exactly ``count`` fields; ``counted`` files start with a line holding the row count."""
    lines = _lines(path)
    if counted:
        try:
            expected = int(lines[0].strip())
        except (IndexError, ValueError):
            raise DataError(f"{path}: the first line should be the number of rows (KG-S2S layout)") from None
        lines = lines[1:]
        if expected != len(lines):
            raise DataError(f"{path}: the count line says {expected} rows, the file holds {len(lines)}")
    rows = []
    for number, line in enumerate(lines, 2 if counted else 1):
        fields = line.split(sep, count - 1) if sep else line.split()
        if len(fields) != count:
            raise DataError(
                f"{path}:{number}: expected {count} fields separated by "
                f"{'a tab' if sep else 'whitespace'}, got {len(fields)}: {line[:80]!r}"
            )
        rows.append([f.strip() for f in fields])
    return rows


def _mapping(path: Path, counted: bool = False) -> dict[str, str]:
    return {key: value for key, value in _columns(path, 2, counted=counted)}


def _check_known(graph: KnowledgeGraph, where: Path) -> None:
    for split, triples in graph.splits.items():
        for h, r, t in triples:
            for entity in (h, t):
                if entity not in graph.entity_names:
                    raise DataError(
                        f"{where}: {split} triple ({h}, {r}, {t}) names entity {entity!r}, which the "
                        f"entity file does not list"
                    )
            if r not in graph.relation_names:
                raise DataError(
                    f"{where}: {split} triple ({h}, {r}, {t}) names relation {r!r}, which the "
                    f"relation file does not list"
                )


def read_kgbert(root: Path) -> KnowledgeGraph:
    splits = {
        split: [tuple(row) for row in _columns(root / f"{file}.tsv", 3)]
        for split, file in (("train", "train"), ("valid", "dev"), ("test", "test"))
    }
    texts = _mapping(root / "entity2text.txt")
    long_file = root / "entity2textlong.txt"
    descriptions = _mapping(long_file) if long_file.is_file() else {}
    return KnowledgeGraph(texts, descriptions, _mapping(root / "relation2text.txt"), splits)


def read_kgs2s(root: Path) -> KnowledgeGraph:
    entity_ids = {number: original for original, number in _columns(root / "entity2id.txt", 2, counted=True)}
    relation_ids = {number: original for original, number in _columns(root / "relation2id.txt", 2, counted=True)}

    def by_original(file: str, ids: dict[str, str]) -> dict[str, str]:
        path = root / file
        if not path.is_file():
            return {}
        return {ids[number]: text for number, text in _columns(path, 2, counted=True)}

    splits = {}
    for split in SPLITS:
        path = root / f"{split}2id.txt"
        triples = []
        for number, (h, t, r) in enumerate(_columns(path, 3, sep=None, counted=True), 2):
            try:
                triples.append((entity_ids[h], relation_ids[r], entity_ids[t]))
            except KeyError as e:
                raise DataError(f"{path}:{number}: id {e.args[0]} is not in entity2id.txt / relation2id.txt") from None
        splits[split] = triples
    names = by_original("entityid2name.txt", entity_ids) or {e: e for e in entity_ids.values()}
    relations = by_original("relationid2name.txt", relation_ids) or {r: r for r in relation_ids.values()}
    return KnowledgeGraph(names, by_original("entityid2description.txt", entity_ids), relations, splits)


def read_plain(root: Path) -> KnowledgeGraph:
    splits = {split: [tuple(row) for row in _columns(root / f"{split}.txt", 3)] for split in SPLITS}
    entities = {e: e for triples in splits.values() for h, _, t in triples for e in (h, t)}
    relations = {r: r for triples in splits.values() for _, r, _ in triples}
    if (root / "entity2text.txt").is_file():
        entities.update(_mapping(root / "entity2text.txt"))
    if (root / "relation2text.txt").is_file():
        relations.update(_mapping(root / "relation2text.txt"))
    return KnowledgeGraph(entities, {}, relations, splits)


READERS = {"kgbert": read_kgbert, "kgs2s": read_kgs2s, "plain": read_plain}


def _clean_names(graph: KnowledgeGraph, name_separator: Optional[str]) -> KnowledgeGraph:
    """Entity texts like 'stool, solid excretory product' or 'tombstone , NN , 1': the name is the part
    before the separator; the rest becomes the description when there is none."""
    if not name_separator:
        return graph
    names, descriptions = {}, dict(graph.entity_descriptions)
    for entity, text in graph.entity_names.items():
        name, _, rest = text.partition(name_separator)
        names[entity] = name.strip() or text
        if rest.strip() and entity not in descriptions:
            descriptions[entity] = rest.strip()
    return KnowledgeGraph(names, descriptions, graph.relation_names, graph.splits)


# ---------------------------------------------------------------- synthetic graph
_FIRST = [
    "Alice",
    "Bruno",
    "Chloe",
    "Dario",
    "Elena",
    "Farid",
    "Greta",
    "Hugo",
    "Irene",
    "Jonas",
    "Kira",
    "Luca",
    "Maya",
    "Nils",
    "Olga",
    "Pavel",
    "Quinn",
    "Rosa",
    "Sven",
    "Tara",
    "Umar",
    "Vera",
    "Wim",
    "Yara",
]
_LAST = ["Moreno", "Novak", "Berg", "Costa", "Dahl", "Ivanova", "Kovac", "Lind", "Okafor", "Petit", "Rossi", "Silva"]
_COUNTRIES = {
    "Norland": ["Frostby", "Kalmo", "Vik"],
    "Sudena": ["Porto Azul", "Marisa", "Calda"],
    "Ostmark": ["Brenn", "Lutz", "Ober"],
    "Westia": ["Ashford", "Kingsbury", "Dunmore"],
}
_PROFESSIONS = {
    "painter": "paints pictures",
    "baker": "bakes bread",
    "surgeon": "operates on patients",
    "pilot": "flies aircraft",
    "teacher": "teaches pupils",
    "architect": "designs buildings",
}


def synthetic_kg(num_people: int = 60, seed: int = 1234, eval_fraction: float = 0.15) -> KnowledgeGraph:
    """A small graph whose held-out triples follow from the training triples.

    People are born in cities, cities lie in countries, so a person's nationality is the country of
    their birth city; people work in professions, and share them with their colleagues. Valid and test
    hold nationality and profession triples only, each of whose entities occurs in training.
    """
    rng = random.Random(seed)
    full_names = [f"{a} {b}" for a in _FIRST for b in _LAST]
    if num_people > len(full_names):
        raise DataError(f"synthetic_kg: at most {len(full_names)} people, asked for {num_people}")
    people = rng.sample(full_names, num_people)
    city_country = {city: country for country, cities in _COUNTRIES.items() for city in cities}
    names: dict[str, str] = {}
    descriptions: dict[str, str] = {}

    def entity(kind: str, name: str, description: str) -> str:
        uid = f"{kind}{len(names):03d}"
        names[uid] = name
        descriptions[uid] = description
        return uid

    countries = {c: entity("C", c, "a country") for c in _COUNTRIES}
    cities = {c: entity("T", c, f"a city in {k}") for c, k in city_country.items()}
    professions = {p: entity("P", p, f"a person who {what}") for p, what in _PROFESSIONS.items()}
    relations = {
        "born_in": "was born in",
        "located_in": "is located in",
        "nationality": "is a citizen of",
        "profession": "works as",
        "colleague_of": "works with",
    }
    structural: list[Triple] = [(cities[c], "located_in", countries[k]) for c, k in city_country.items()]
    derived: list[Triple] = []
    by_profession: dict[str, list[str]] = {}
    for person in people:
        uid = entity("E", person, "a person")
        city = rng.choice(list(cities))
        job = rng.choice(list(professions))
        by_profession.setdefault(job, []).append(uid)
        structural.append((uid, "born_in", cities[city]))
        derived.append((uid, "nationality", countries[city_country[city]]))
        derived.append((uid, "profession", professions[job]))
    for members in by_profession.values():
        for a, b in zip(members, members[1:]):
            structural.append((a, "colleague_of", b))
    rng.shuffle(derived)
    held_out = int(len(derived) * eval_fraction)
    valid, test, train = derived[:held_out], derived[held_out : 2 * held_out], derived[2 * held_out :]
    # a held-out triple about an entity training never shows cannot follow from it (a profession only held-out
    # triples name): left out, the training triples as drawn
    seen = {entity for h, _, t in structural + train for entity in (h, t)}
    valid, test = ([(h, r, t) for h, r, t in split if h in seen and t in seen] for split in (valid, test))
    return KnowledgeGraph(names, descriptions, relations, {"train": structural + train, "valid": valid, "test": test})


# ---------------------------------------------------------------- task
@dataclass
class KGTask:
    """The link-prediction task of a run: the graph, the training triples and the evaluation queries."""

    name: str
    graph: KnowledgeGraph
    train_triples: list[Triple]
    eval_sets: dict[str, list[Triple]]  # "eval" first
    contexts_file: Optional[Path] = None
    contexts: dict[Triple, str] = field(default_factory=dict)
    eval_candidates: Optional[int] = None  # None: rank against every entity; N: against N sampled ones
    seed: int = 0  # the run's seed: sampled candidates, generation
    demos: list = field(default_factory=list)  # no in-context demonstrations (what a run records of its task)
    votes: int = 1  # each query is ranked once (a Task's eval sets may hold several draws of one query)

    def entity_text(self, entity: str, with_description: bool = True) -> str:
        name = self.graph.entity_names[entity]
        description = self.graph.entity_descriptions.get(entity) if with_description else None
        return f"{name}, {description}" if description else name

    def relation_text(self, relation: str) -> str:
        return self.graph.relation_names[relation]

    @property
    def known_triples(self) -> set[Triple]:
        """Every triple of the training split, also those a subsample leaves out: none is a negative."""
        return set(self.graph.splits["train"])


def _subsample(triples: list[Triple], size: Optional[int], seed: int) -> list[Triple]:
    if size is None or size >= len(triples):
        return list(triples)
    return random.Random(seed).sample(triples, size)


def load_graph(spec: DictConfig) -> KnowledgeGraph:
    source = spec.source
    if source.layout == "synthetic":
        graph = synthetic_kg(source.num_people, source.seed)
    else:
        if source.layout not in READERS:
            raise DataError(
                f"dataset.source.layout={source.layout!r} is unknown; use one of {', '.join([*READERS, 'synthetic'])}"
            )
        if not source.data_dir:
            raise DataError(
                f"dataset={spec.name} reads local files: set dataset.source.data_dir to the directory "
                f"with the {source.layout} layout (see README, 'Contextualization distillation')"
            )
        root = Path(source.data_dir).expanduser()
        graph = READERS[source.layout](root)
        _check_known(graph, root)
    return _clean_names(graph, source.name_separator)


def query_keys(triple: Triple) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
    """The (h, r, tail) and (r, t, head) queries a triple is ranked in."""
    h, r, t = triple
    return (h, r, "tail"), (r, t, "head")


def build_kg_task(spec: DictConfig, seed: int) -> KGTask:
    """The graph, a (seeded) subsample of its training triples and of the evaluation split."""
    if spec.kind != "knowledge_graph":  # declared by the dataset (KGDatasetConfig)
        raise DataError(f"dataset={spec.name} is not a knowledge graph; use dataset=kg_synthetic, wn18rr or fb15k237n")
    graph = load_graph(spec)
    data_seed = spec.subsample_seed
    train = _subsample(graph.splits["train"], spec.num_train, data_seed)
    for key in ("eval_split", "validation_split"):
        if spec[key] is not None and spec[key] not in graph.splits:
            raise DataError(f"dataset.{key}={spec[key]!r}; use one of {', '.join(SPLITS)}")
    eval_sets = {"eval": _subsample(graph.splits[spec.eval_split], spec.num_eval, data_seed + 1)}
    if spec.validation_split:  # a set of its own, named after its split (trainer.selection reads it)
        split = spec.validation_split
        eval_sets[split] = _subsample(graph.splits[split], spec.num_validation, data_seed + 2)
    if spec.eval_candidates is not None:
        # a query's candidates are entities that are none of its known answers: fewer of them than asked for would
        # rank it against fewer than the sampledN_ its metrics name
        answers = Counter(key for triple in graph.true_triples() for key in query_keys(triple))
        most = max(answers[key] for triple in {t for s in eval_sets.values() for t in s} for key in query_keys(triple))
        if spec.eval_candidates > len(graph.entities) - most:
            raise DataError(
                f"dataset.eval_candidates={spec.eval_candidates}, but {spec.name} has {len(graph.entities)} entities "
                f"and one of its evaluated queries {most} known answers, which leaves {len(graph.entities) - most} "
                f"to sample from; sample at most {len(graph.entities) - most}, or rank against all of them with "
                "dataset.eval_candidates=null"
            )
    contexts_file = Path(spec.contexts_file).expanduser() if spec.contexts_file else None
    task = KGTask(spec.name, graph, train, eval_sets, contexts_file, eval_candidates=spec.eval_candidates, seed=seed)
    if contexts_file is not None and contexts_file.is_file():
        id_dir = Path(spec.contexts_id_dir).expanduser() if spec.contexts_id_dir else None
        task.contexts = read_contexts(contexts_file, graph, id_dir)
    return task


# ---------------------------------------------------------------- contexts
RELEASED_SEPARATOR = "|**|"


def _count_line(first_line: str) -> Optional[int]:
    """The row count a released ``knowledge_context.txt`` starts with; None for any other contexts file."""
    return int(first_line.strip()) if first_line.strip().isdigit() else None


def _kgs2s_ids(path: Path, id_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """KG-S2S integer id -> original id, for entities and relations."""
    files = [id_dir / "entity2id.txt", id_dir / "relation2id.txt"]
    if not all(f.is_file() for f in files):
        raise DataError(
            f"{path} is a released knowledge_context.txt (a count line, then KG-S2S integer ids); "
            f"mapping its ids needs entity2id.txt and relation2id.txt, which {id_dir} lacks. Set "
            f"dataset.contexts_id_dir to the KG-S2S directory of the dataset (e.g. .../kgs2s_processed)"
        )
    entities, relations = ({number: original for original, number in _columns(f, 2, counted=True)} for f in files)
    return entities, relations


def _named_triples(
    line: Triple, graph: KnowledgeGraph, by_name: dict[str, list[str]], training: set[Triple]
) -> list[Triple]:
    """The triples a context line is about whose head and tail are ids or entity names. A name that several
    entities share (WN18RR's bare lemmas: 12,873 of its 40,943 entities) stands for those of them that make a
    training triple with the line's other side; where none does, for its first entity."""
    h, r, t = line
    heads, tails = ([e] if e in graph.entity_names else by_name.get(e, [e]) for e in (h, t))
    candidates = [(head, r, tail) for head in heads for tail in tails]
    return [c for c in candidates if c in training] or candidates[:1]


def read_contexts(
    path: Path, graph: Optional[KnowledgeGraph] = None, id_dir: Optional[Path] = None
) -> dict[Triple, str]:
    """Contexts keyed by triple (original ids) from

    - JSON lines ``{head, relation, tail, context}`` (a :class:`JsonLines` file: a last line cut short by an
      interrupted write is left out); a row stage 1 wrote also holds the ``text`` of its triple
      (:meth:`KnowledgeGraph.triple_text`), and with ``graph`` a row written about other names (the same ids
      in another graph; :meth:`KnowledgeGraph.written_about`) is left out;
    - the released writer's ``knowledge_context.txt``: a count line, then ``head |**| tail |**| relation
      |**| text`` with KG-S2S integer ids, mapped through ``id_dir``'s ``entity2id.txt`` and
      ``relation2id.txt`` (default: the file's own directory, where the released writer leaves it);
    - the same lines without the count line, with original ids or entity names (KG-BERT's input).
    """
    provenance.note_data_file(path)
    content = path.read_text(encoding="utf-8")
    if content.lstrip().startswith("{"):  # JSON lines
        contexts: dict[Triple, str] = {}
        other_texts = 0
        for number, record in enumerate(JsonLines(path).read(), 1):
            try:
                triple, context = (record["head"], record["relation"], record["tail"]), record["context"]
            except KeyError:
                raise DataError(f"{path}: record {number} lacks head, relation, tail or context") from None
            if graph is not None and "text" in record and not graph.written_about(triple, record["text"]):
                other_texts += 1
            else:
                contexts[triple] = context
        if other_texts:
            log.warning(
                "%s: left out %d contexts written about other entity or relation names than this graph's (another "
                "graph, or other names): write them again with this dataset's settings",
                path,
                other_texts,
            )
        return contexts
    lines = [(number, line) for number, line in enumerate(content.splitlines(), 1) if line.strip()]
    count = _count_line(lines[0][1]) if lines else None
    if count is not None:
        lines = lines[1:]
    integer_ids = _kgs2s_ids(path, id_dir or path.parent) if count is not None else None
    by_name: dict[str, list[str]] = {}
    training: set[Triple] = set()
    if graph is not None and integer_ids is None:  # the lines may name entities rather than give their ids
        for entity, name in graph.entity_names.items():
            by_name.setdefault(name, []).append(entity)
        training = set(graph.splits.get("train", []))
    contexts = {}
    for number, line in lines:
        parts = [p.strip() for p in line.split(RELEASED_SEPARATOR)]
        if len(parts) != 4:
            raise DataError(
                f"{path}:{number}: expected 'head |**| tail |**| relation |**| text'"
                + ("" if count is not None else ", or JSON lines {head, relation, tail, context}")
            )
        h, t, r, text = parts
        if integer_ids is not None:
            entities, relations = integer_ids
            try:
                h, t, r = entities[h], entities[t], relations[r]
            except KeyError as e:
                raise DataError(
                    f"{path}:{number}: id {e.args[0]} is not in the KG-S2S entity2id.txt / relation2id.txt"
                ) from None
        about = _named_triples((h, r, t), graph, by_name, training) if by_name else [(h, r, t)]
        contexts.update(dict.fromkeys(about, text))
    if count is not None and count != len(lines):
        raise DataError(f"{path}: the count line says {count} contexts, the file holds {len(lines)}")
    return contexts


def missing_contexts(task: KGTask) -> list[Triple]:
    return [t for t in task.train_triples if t not in task.contexts]
