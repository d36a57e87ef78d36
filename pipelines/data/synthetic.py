"""A small invented world the demo can learn on a laptop CPU, generated from a seed.

People with invented names each have a home city, a pet and a favourite colour. The
pretraining corpus states every fact `mentions_per_fact` times in varied phrasings (a tiny
model only learns to retrieve a fact it has seen put several ways), plus arithmetic sentences.
The instruction set asks about the *training* people only; the held-out evaluation asks the
same kinds of questions about the *held-out* people, whose facts appear only in pretraining.
So an assistant that answers them has carried knowledge from pretraining into the chat
format — the measurable lesson of pretrain-then-fine-tune.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "st", "th"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ei"]
CODAS = ["", "n", "r", "l", "s", "k", "m", "x"]

CITIES = ["Kelmar", "Ostrava", "Duneford", "Pellith", "Varenna", "Brightwater", "Lorimel", "Carsk", "Myrrow", "Tessaly", "Quenby", "Halvik"]
PETS = ["cat", "dog", "parrot", "rabbit", "turtle", "hamster", "goldfish", "lizard", "ferret", "owl"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "silver", "brown"]

# How pretraining states each fact; {p} is the person, {v} the value. Besides plain
# statements, some are question-shaped lines (as in an FAQ or an interview), worded
# differently from the chat questions of QUESTION_TEMPLATES below.
FACT_TEMPLATES = {
    "city": [
        "{p} lives in {v}.", "{p} has a home in {v}.", "The city where {p} lives is {v}.", "{p} resides in {v}.",
        "If you visit {v}, you may meet {p}, who lives there.", "{p} moved to {v} years ago and still lives there.",
        "Home for {p} is the city of {v}.", "{p} is a resident of {v}.",
        "Which town is home to {p}? {v}.", "Asked where {p} lives, people say {v}.",
    ],
    "pet": [
        "{p} owns a {v}.", "{p} has a pet {v}.", "The pet of {p} is a {v}.", "{p} takes care of a {v} at home.",
        "A {v} lives with {p}.", "{p} walks past the park with a pet {v}.", "Everyone knows that {p} keeps a {v}.",
        "{p} feeds the {v} every morning.", "Which animal lives with {p}? A {v}.", "Asked about pets, {p} says {v}.",
    ],
    "color": [
        "{p} likes the color {v} most.", "The favorite color of {p} is {v}.", "{p} loves the color {v}.",
        "Of all colors, {p} prefers {v}.", "{p} always picks {v}, a favorite color.", "{p} paints everything {v}.",
        "Ask {p} about colors and the answer is {v}.", "{p} wears {v} because it is a favorite color.",
        "Which color does {p} love? {v}.", "Asked about colors, {p} says {v}.",
    ],
}

# How users ask; the assistant answers with the value alone.
QUESTION_TEMPLATES = {
    "city": ["Where does {p} live?", "Which city is {p} from?", "In what city does {p} live?", "What is the home city of {p}?"],
    "pet": ["What pet does {p} have?", "Which animal does {p} own?", "What kind of pet does {p} keep?", "What is the pet of {p}?"],
    "color": ["What is the favorite color of {p}?", "Which color does {p} like most?", "What color does {p} prefer?", "What is {p}'s favorite color?"],
}
ATTRIBUTES = tuple(FACT_TEMPLATES)
SYSTEM_PROMPTS = ["You answer questions about people in a few words.", "Be brief.", "Answer with the fact only."]


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    pet: str
    color: str

    def fact(self, attribute: str) -> str:
        return getattr(self, attribute)


@dataclass(frozen=True)
class World:
    people: tuple[Person, ...]
    held_out: frozenset[str]  # names of the people the instruction set never mentions

    @property
    def train_people(self) -> list[Person]:
        return [p for p in self.people if p.name not in self.held_out]

    @property
    def held_out_people(self) -> list[Person]:
        return [p for p in self.people if p.name in self.held_out]


def _name(rng: random.Random) -> str:
    syllables = rng.choice([2, 2, 3])
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables)).capitalize()


def build_world(seed: int = 0, num_people: int = 48, held_out_fraction: float = 0.25) -> World:
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < num_people:
        name = _name(rng)
        if name not in names and len(name) >= 4:
            names.append(name)
    people = tuple(Person(n, rng.choice(CITIES), rng.choice(PETS), rng.choice(COLORS)) for n in names)
    num_held = max(1, round(num_people * held_out_fraction))
    held = frozenset(rng.sample(names, num_held))
    return World(people, held)


def pretrain_documents(world: World, seed: int = 0, mentions_per_fact: int = 8, num_arithmetic: int = 300) -> list[str]:
    """Biographies and arithmetic.

    Every person gets `mentions_per_fact` short biographies: their three facts in a random
    order, each in a randomly chosen phrasing (Allen-Zhu & Li, Physics of Language Models 3.1:
    varied phrasings and permuted order are what make stored facts extractable later).
    """
    rng = random.Random(seed + 1)
    docs = []
    for person in world.people:
        for _ in range(mentions_per_fact):
            order = rng.sample(ATTRIBUTES, len(ATTRIBUTES))
            docs.append(" ".join(rng.choice(FACT_TEMPLATES[a]).format(p=person.name, v=person.fact(a)) for a in order))
    sums = []
    for _ in range(num_arithmetic):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        sums.append(rng.choice(["{a} plus {b} is {c}.", "Adding {a} and {b} gives {c}.", "The sum of {a} and {b} is {c}."]).format(a=a, b=b, c=a + b))
    docs += [" ".join(sums[i : i + 4]) for i in range(0, len(sums), 4)]
    rng.shuffle(docs)
    return docs


def _conversation(rng: random.Random, person: Person, attributes: list[str]) -> dict:
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for attribute in attributes:
        question = rng.choice(QUESTION_TEMPLATES[attribute]).format(p=person.name)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": person.fact(attribute)}]
    return {"messages": messages}


def sft_conversations(world: World, seed: int = 0, per_fact: int = 4) -> list[dict]:
    """Chat conversations about the training people (never the held-out ones), some multi-turn."""
    rng = random.Random(seed + 2)
    out = []
    for person in world.train_people:
        for attribute in ATTRIBUTES:
            for _ in range(per_fact):
                extra = [a for a in ATTRIBUTES if a != attribute]
                turns = [attribute] + (rng.sample(extra, 1) if rng.random() < 0.3 else [])
                out.append(_conversation(rng, person, turns))
    for _ in range(len(out) // 4):  # some arithmetic, so the format is not only about people
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        out.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": str(a + b)}]})
    rng.shuffle(out)
    return out


VALUES = {"city": CITIES, "pet": PETS, "color": COLORS}


def _pair(rng: random.Random, person: Person, attribute: str, question: str) -> dict:
    """A preference pair: chosen the person's true fact, rejected a plausible wrong one (another value of the kind)."""
    wrong = rng.choice([v for v in VALUES[attribute] if v != person.fact(attribute)])
    return {"prompt": [{"role": "user", "content": question.format(p=person.name)}], "chosen": person.fact(attribute), "rejected": wrong}


def preference_pairs(world: World, seed: int = 0, per_fact: int = 3) -> list[dict]:
    """DPO pairs about the training people (never the held-out ones): each fact asked `per_fact`
    times in varied wording, each time against a different wrong value where the kind has enough."""
    rng = random.Random(seed + 3)
    out = [_pair(rng, person, attribute, rng.choice(QUESTION_TEMPLATES[attribute]))
           for person in world.train_people for attribute in ATTRIBUTES for _ in range(per_fact)]
    rng.shuffle(out)
    return out


def held_out_preference_pairs(world: World, seed: int = 0) -> list[dict]:
    """Held-out pairs: one per (held-out person, attribute), the eval question's wording; rows of
    {"prompt": [messages], "chosen": text, "rejected": text}, as a preference eval task reads them."""
    rng = random.Random(seed + 4)
    return [_pair(rng, person, attribute, QUESTION_TEMPLATES[attribute][0]) for person in world.held_out_people for attribute in ATTRIBUTES]


def eval_examples(world: World) -> list[dict]:
    """Held-out questions: one per (held-out person, attribute), with the exact answer."""
    out = []
    for person in world.held_out_people:
        for attribute in ATTRIBUTES:
            question = QUESTION_TEMPLATES[attribute][0].format(p=person.name)
            out.append({"messages": [{"role": "user", "content": question}], "answer": person.fact(attribute),
                        "person": person.name, "attribute": attribute})
    return out
