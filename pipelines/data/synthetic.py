"""A small invented world the demo can learn on a laptop CPU, generated from a seed.

People with invented names each have a home city, a pet, a favourite colour and a birthplace
(another city). The pretraining corpus states every fact the job names (`facts`; the main demo:
city, pet, colour) `mentions_per_fact` times in varied phrasings (a tiny model only learns to
retrieve a fact it has seen put several ways), plus arithmetic sentences. The instruction set
asks about the *training* people only; the held-out evaluation asks the same kinds of questions
about the *held-out* people, whose facts appear only in pretraining. So an assistant that
answers them has carried knowledge from pretraining into the chat format — the measurable
lesson of pretrain-then-fine-tune.

The preference demo (jobs/tiny-assistant-dpo.yaml) adds the birthplace: pretraining states it,
SFT never asks about it, and a question about where someone is *originally from* is one an
SFT model answers with the home city. DPO pairs about the training people prefer the birthplace
to the home city; the held-out pairs ask the same of people no pair mentions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

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
    "birthplace": [
        "{p} was born in {v}.", "The birthplace of {p} is {v}.", "{p} is originally from {v}.",
        "{p} spent a childhood in {v}.", "Born in {v}, {p} moved away later.", "{p} grew up in {v}.",
        "{p} came into the world in {v}.", "The city of {p}'s birth is {v}.",
        "Where was {p} born? In {v}.", "Asked about a birthplace, {p} says {v}.",
    ],
}

# How users ask; the assistant answers with the value alone.
QUESTION_TEMPLATES = {
    "city": ["Where does {p} live?", "Which city is {p} from?", "In what city does {p} live?", "What is the home city of {p}?"],
    "pet": ["What pet does {p} have?", "Which animal does {p} own?", "What kind of pet does {p} keep?", "What is the pet of {p}?"],
    "color": ["What is the favorite color of {p}?", "Which color does {p} like most?", "What color does {p} prefer?", "What is {p}'s favorite color?"],
    # The first (the held-out wording) is close to a home-city question on purpose: see the docstring.
    "birthplace": ["Which city is {p} originally from?", "Where was {p} born?", "In which city was {p} born?", "What is the birthplace of {p}?"],
}
ATTRIBUTES = ("city", "pet", "color")  # the main demo's facts (data.synthetic.facts' default)
SYSTEM_PROMPTS = ["You answer questions about people in a few words.", "Be brief.", "Answer with the fact only."]


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    pet: str
    color: str
    birthplace: str = ""

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
    # Birthplaces from a stream of their own, so the other facts (and the held-out people) are
    # those of a world without them; never the home city.
    born = random.Random(seed + 5)
    people = tuple(replace(p, birthplace=born.choice([c for c in CITIES if c != p.city])) for p in people)
    return World(people, held)


def pretrain_documents(world: World, seed: int = 0, mentions_per_fact: int = 8, num_arithmetic: int = 300,
                       facts: tuple[str, ...] = ATTRIBUTES) -> list[str]:
    """Biographies and arithmetic.

    Every person gets `mentions_per_fact` short biographies: their `facts` in a random
    order, each in a randomly chosen phrasing (Allen-Zhu & Li, Physics of Language Models 3.1:
    varied phrasings and permuted order are what make stored facts extractable later).
    """
    rng = random.Random(seed + 1)
    docs = []
    for person in world.people:
        for _ in range(mentions_per_fact):
            order = rng.sample(facts, len(facts))
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


def sft_conversations(world: World, seed: int = 0, per_fact: int = 4, facts: tuple[str, ...] = ATTRIBUTES) -> list[dict]:
    """Chat conversations about the training people (never the held-out ones) and their `facts`, some multi-turn."""
    rng = random.Random(seed + 2)
    out = []
    for person in world.train_people:
        for attribute in facts:
            for _ in range(per_fact):
                extra = [a for a in facts if a != attribute]
                turns = [attribute] + (rng.sample(extra, 1) if extra and rng.random() < 0.3 else [])
                out.append(_conversation(rng, person, turns))
    for _ in range(len(out) // 4):  # some arithmetic, so the format is not only about people
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        out.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": str(a + b)}]})
    rng.shuffle(out)
    return out


VALUES = {"city": CITIES, "pet": PETS, "color": COLORS}


def _pair(rng: random.Random, person: Person, attribute: str, question: str, facts: tuple[str, ...]) -> dict:
    """A preference pair: chosen the person's true fact, rejected a plausible wrong one: another
    value of the kind, except where both cities are asked about, where each is the other's wrong
    answer (the confusion there is to be taught away)."""
    if attribute == "birthplace":
        wrong = person.city
    elif attribute == "city" and "birthplace" in facts:
        wrong = person.birthplace
    else:
        wrong = rng.choice([v for v in VALUES[attribute] if v != person.fact(attribute)])
    return {"prompt": [{"role": "user", "content": question.format(p=person.name)}], "chosen": person.fact(attribute), "rejected": wrong}


def preference_pairs(world: World, seed: int = 0, per_fact: int = 3, facts: tuple[str, ...] = ATTRIBUTES) -> list[dict]:
    """DPO pairs about the training people (never the held-out ones): each of their `facts` asked
    `per_fact` times in varied wording, each time against a wrong value (see _pair)."""
    rng = random.Random(seed + 3)
    out = [_pair(rng, person, attribute, rng.choice(QUESTION_TEMPLATES[attribute]), facts)
           for person in world.train_people for attribute in facts for _ in range(per_fact)]
    rng.shuffle(out)
    return out


def held_out_preference_pairs(world: World, seed: int = 0, facts: tuple[str, ...] = ATTRIBUTES) -> list[dict]:
    """Held-out pairs: one per (held-out person, fact), the eval question's wording; rows of
    {"prompt": [messages], "chosen": text, "rejected": text}, as a preference eval task reads them."""
    rng = random.Random(seed + 4)
    return [_pair(rng, person, attribute, QUESTION_TEMPLATES[attribute][0], facts)
            for person in world.held_out_people for attribute in facts]


def eval_examples(world: World, facts: tuple[str, ...] = ATTRIBUTES) -> list[dict]:
    """Held-out questions: one per (held-out person, fact), with the exact answer."""
    out = []
    for person in world.held_out_people:
        for attribute in facts:
            question = QUESTION_TEMPLATES[attribute][0].format(p=person.name)
            out.append({"messages": [{"role": "user", "content": question}], "answer": person.fact(attribute),
                        "person": person.name, "attribute": attribute})
    return out
