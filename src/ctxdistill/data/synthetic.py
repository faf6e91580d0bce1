"""Synthetic offline task: sentiment of short template reviews (label 0 positive, 1 negative).

conf/dataset/synthetic.yaml answers them with arbitrary label words (" foo" / " bar"):
the model can judge the sentiment of these sentences, but only the context
(instruction + demonstrations) tells it which word means what, so the teacher with
the context is far better than the bare model.
"""

import random

# Each word list is cut in half: even indices go to "train", odd to "eval", so
# held-out reviews use adjectives and subjects never seen in the train pool.
_POSITIVE = [
    "wonderful",
    "excellent",
    "delightful",
    "fantastic",
    "superb",
    "lovely",
    "brilliant",
    "amazing",
    "charming",
    "pleasant",
    "outstanding",
    "marvelous",
    "terrific",
    "great",
    "enjoyable",
    "perfect",
    "impressive",
    "beautiful",
    "fabulous",
    "splendid",
    "friendly",
    "fresh",
    "stunning",
    "awesome",
]
_NEGATIVE = [
    "terrible",
    "awful",
    "horrible",
    "dreadful",
    "disgusting",
    "boring",
    "rude",
    "miserable",
    "disappointing",
    "poor",
    "nasty",
    "unpleasant",
    "dull",
    "lousy",
    "annoying",
    "pathetic",
    "bad",
    "ugly",
    "stale",
    "broken",
    "painful",
    "filthy",
    "useless",
    "mediocre",
]
_SUBJECTS = [
    "food",
    "movie",
    "service",
    "hotel",
    "book",
    "concert",
    "staff",
    "room",
    "meal",
    "show",
    "game",
    "trip",
    "coffee",
    "album",
    "phone",
    "car",
    "restaurant",
    "song",
    "store",
    "teacher",
    "pizza",
    "camera",
    "play",
    "park",
]
_INTENSIFIERS = ["", "really ", "very ", "truly ", "quite ", "so "]
_FORMS = [
    "The {subj} was {i}{a}.",
    "The {subj} was {i}{a} and {b}.",
    "I thought the {subj} was {i}{a}.",
    "This {subj} is {i}{a}, even {b}.",
    "Honestly, the {subj} is {i}{a}.",
    "Our {subj} was {a} and {i}{b}.",
]
# Other sentence frames, for an out-of-domain set: the same sentiment words, written as no training review is.
_OTHER_FORMS = [
    "My verdict on the {subj}: {i}{a}.",
    "Everyone agreed the {subj} felt {i}{a}.",
    "What a {a} {subj}!",
    "The {subj}? {i}{a}, and {b} too.",
    "Last week the {subj} seemed {i}{a}.",
    "If you ask me, the {subj} is {i}{a}.",
]
_PHRASINGS = {"reviews": _FORMS, "other": _OTHER_FORMS}
_SPLITS = {"train": 0, "eval": 1}


def _part(words: list[str], split: str) -> list[str]:
    return words[_SPLITS[split] :: 2]


def generate_examples(num_examples: int, seed: int, split: str = "train", phrasing: str = "reviews") -> list[dict]:
    """Deterministic examples, each {"review": str, "label": int}.

    Labels alternate (balanced), reviews are distinct, and ``split`` ("train" or
    "eval") selects disjoint halves of the adjective and subject lists, so
    train and eval texts never overlap whatever the seeds. ``phrasing="other"`` writes them
    in sentence frames that the reviews never use (an out-of-domain set).
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if phrasing not in _PHRASINGS:
        raise ValueError(f"phrasing must be one of {sorted(_PHRASINGS)}, got {phrasing!r}")
    forms = _PHRASINGS[phrasing]
    rng = random.Random(seed)
    adjectives = [_part(_POSITIVE, split), _part(_NEGATIVE, split)]
    subjects = _part(_SUBJECTS, split)
    examples, seen = [], set()
    # Each split holds tens of thousands of distinct texts; the bound stops an
    # impossible request (too many examples) from looping forever.
    for _ in range(num_examples * 1000):
        if len(examples) == num_examples:
            return examples
        label = len(examples) % 2
        a, b = rng.sample(adjectives[label], 2)
        review = rng.choice(forms).format(subj=rng.choice(subjects), i=rng.choice(_INTENSIFIERS), a=a, b=b)
        if review not in seen:
            seen.add(review)
            examples.append({"review": review, "label": label})
    raise ValueError(f"cannot generate {num_examples} distinct {split} examples")


# More binary tasks for task mixtures (in-context tuning over several tasks): the class of an
# everyday thing. Like the reviews, they are answered with arbitrary label words (see
# conf/dataset/synthetic_*.yaml), so only the demonstrations say which word means which class.
_CATEGORIES = {
    "size": (  # 0 = big, 1 = small
        [
            "elephant",
            "mountain",
            "whale",
            "bus",
            "airplane",
            "skyscraper",
            "ship",
            "giraffe",
            "truck",
            "castle",
            "stadium",
            "cathedral",
            "dinosaur",
            "bridge",
            "tractor",
            "volcano",
            "train",
            "rhinoceros",
            "barn",
            "ocean",
        ],
        [
            "ant",
            "coin",
            "button",
            "pea",
            "needle",
            "bead",
            "grain of rice",
            "ladybug",
            "paperclip",
            "thimble",
            "seed",
            "marble",
            "earring",
            "flea",
            "pebble",
            "raisin",
            "stamp",
            "crumb",
            "tack",
            "mosquito",
        ],
    ),
    "temperature": (  # 0 = hot, 1 = cold
        [
            "fire",
            "oven",
            "lava",
            "sun",
            "stove",
            "bonfire",
            "desert",
            "furnace",
            "kettle",
            "sauna",
            "toaster",
            "volcano",
            "boiling water",
            "radiator",
            "grill",
            "candle flame",
            "hot soup",
            "heater",
            "steam",
            "campfire",
        ],
        [
            "ice",
            "snow",
            "glacier",
            "freezer",
            "icicle",
            "frost",
            "iceberg",
            "blizzard",
            "fridge",
            "snowman",
            "ice cream",
            "winter wind",
            "hailstone",
            "polar sea",
            "ice cube",
            "sleet",
            "igloo",
            "frozen lake",
            "snowflake",
            "tundra",
        ],
    ),
    "living": (  # 0 = animal, 1 = object
        [
            "dog",
            "cat",
            "horse",
            "rabbit",
            "lion",
            "sparrow",
            "cow",
            "tiger",
            "goat",
            "parrot",
            "wolf",
            "sheep",
            "fox",
            "monkey",
            "duck",
            "bear",
            "mouse",
            "deer",
            "eagle",
            "frog",
        ],
        [
            "hammer",
            "chair",
            "spoon",
            "lamp",
            "table",
            "bottle",
            "pencil",
            "shoe",
            "clock",
            "window",
            "bucket",
            "ladder",
            "cup",
            "blanket",
            "key",
            "mirror",
            "brush",
            "plate",
            "wallet",
            "umbrella",
        ],
    ),
}
_ITEM_FORMS = ["{x}", "the {x}", "this {x}", "that {x}", "my {x}", "your {x}", "our {x}", "their {x}"]


def generate_category_examples(num_examples: int, seed: int, split: str = "train", task: str = "size") -> list[dict]:
    """Deterministic examples {"item": str, "label": int} of one category task (``task``: size,
    temperature or living); balanced, distinct, and built from disjoint halves of the word lists
    for "train" and "eval"."""
    if task not in _CATEGORIES:
        raise ValueError(f"unknown category task {task!r}; use one of {sorted(_CATEGORIES)}")
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"{task}:{seed}")
    words = [_part(list(class_words), split) for class_words in _CATEGORIES[task]]
    distinct = 2 * min(len(w) for w in words) * len(_ITEM_FORMS)  # balanced: the smaller class bounds it
    if num_examples > distinct:
        raise ValueError(f"the {task} task has {distinct} distinct {split} examples, asked for {num_examples}")
    pools = [[form.format(x=w) for w in class_words for form in _ITEM_FORMS] for class_words in words]
    for pool in pools:
        rng.shuffle(pool)
    return [{"item": pools[i % 2][i // 2], "label": i % 2} for i in range(num_examples)]
