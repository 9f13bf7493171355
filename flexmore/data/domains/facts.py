"""Knowledge-heavy text: a fixed generated world of people, cities and companies, stated in varied sentences.

The world is the same for every seed (it is the knowledge to learn); the seed only changes which sentences state it.
Validation text states the same facts with templates the training text never uses.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

from flexmore.data.domains.streams import split_seed

SALT = 4
CATEGORY = "knowledge"
WORLD_SEED = 20250709
N_PEOPLE, N_CITIES, N_COMPANIES = 600, 60, 150
SYL = ["ka", "lo", "mi", "ra", "ven", "tor", "el", "sa", "dun", "bri", "qua", "zel", "mor", "ti", "an", "gor", "phe",
       "lys", "dor", "ne", "val", "cor", "is", "ur"]
JOBS = ["baker", "pilot", "chemist", "sculptor", "surgeon", "librarian", "architect", "farmer", "judge", "sailor",
        "violinist", "geologist", "engineer", "poet", "astronomer"]
COLORS = ["red", "blue", "green", "amber", "violet", "silver", "teal", "crimson"]
INDUSTRIES = ["shipbuilding", "textiles", "software", "mining", "glassmaking", "publishing", "brewing", "optics"]
COUNTRIES = ["Arveland", "Belmora", "Costaine", "Drevia", "Esterhold", "Fenmark"]


@dataclass(frozen=True)
class Person:
    name: str
    born: int
    city: str
    job: str
    color: str


@dataclass(frozen=True)
class Company:
    name: str
    founded: int
    city: str
    founder: str
    industry: str


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYL) for _ in range(parts)).capitalize()


@lru_cache(maxsize=1)
def world() -> tuple[dict[str, str], list[Person], list[Company]]:
    rng = random.Random(WORLD_SEED)
    cities: dict[str, str] = {}
    while len(cities) < N_CITIES:
        cities.setdefault(_name(rng, 3), rng.choice(COUNTRIES))
    city_names = sorted(cities)
    people, seen = [], set()
    while len(people) < N_PEOPLE:
        name = f"{_name(rng, 2)} {_name(rng, 3)}"
        if name not in seen:
            seen.add(name)
            people.append(Person(name, rng.randint(1900, 2005), rng.choice(city_names), rng.choice(JOBS),
                                 rng.choice(COLORS)))
    companies, seen = [], set()
    while len(companies) < N_COMPANIES:
        name = f"{_name(rng, 2)} {rng.choice(['Works', 'Group', 'Labs', 'Company', 'Guild'])}"
        if name not in seen:
            seen.add(name)
            founder = rng.choice(people)
            companies.append(Company(name, founder.born + rng.randint(20, 50), rng.choice(city_names), founder.name,
                                     rng.choice(INDUSTRIES)))
    return cities, people, companies


# Templates: the last one of each list is held out for validation text (version 3 added training wordings to
# each list, and the framing clauses below).
PERSON_T = [
    "{n} was born in {c} in {y}.", "Born in {y}, {n} grew up in {c}.", "{n} is a native of {c}, born in the year {y}.",
    "The records of {c} list {n} among those born in {y}.", "{n} comes from {c} and was born in {y}.",
    "{c} is the birthplace of {n}, who arrived in {y}.", "In {y}, {n} was born in the city of {c}.",
]
JOB_T = ["{n} works as {a} {j}.", "By profession, {n} is {a} {j}.", "{n} earns a living as {a} {j}.",
         "{n} is {a} {j} by trade.", "For many years {n} has been {a} {j}.", "{n} trained to become {a} {j}."]
COLOR_T = ["The favourite colour of {n} is {k}.", "{n} likes {k} more than any other colour.",
           "Given a choice, {n} would always pick {k}.", "Ask {n}: the best colour is {k}."]
COMPANY_T = [
    "{m} was founded in {c} in {y} by {f}.", "{f} started {m} in {y}; its home is {c}.",
    "In {y}, {f} founded {m}, based in {c}.", "{m} has had its offices in {c} since {f} set it up in {y}.",
    "{m}, a company from {c}, was established by {f} in {y}.",
]
INDUSTRY_T = ["{m} is known for {i}.", "The main business of {m} is {i}.", "Most of what {m} earns comes from {i}.",
              "{m} works in {i}."]
CITY_T = ["{c} is a city in {o}.", "The city of {c} lies in {o}.", "You will find {c} on the map of {o}.",
          "{c} belongs to the country of {o}."]
# Training sentences are sometimes framed by a clause around them (never in validation text), so the wording around
# the facts varies as it does in real text and the expert learns the facts, not one phrasing of them.
LEADS = ["It is known that", "Records show that", "Most people agree that", "An old letter says that",
         "Everyone here knows that", "The archive notes that", "We were told that", "As it happens,"]
TAILS = ["as far as anyone remembers", "or so the story goes", "according to the archive", "as the neighbours say",
         "if the letters are right"]
FRAMED = 0.3  # the share of training sentences with a lead or a tail


# Question-and-answer documents (a tenth of the training text) teach the closed-book format; the evaluation's
# questions (qa_pairs) are worded differently.
QA_FRACTION = 0.1
QA_TRAIN = {
    "city": "Where was {n} born?", "born": "When was {n} born?", "job": "What does {n} do for a living?",
    "founder": "Who started {m}?", "founded": "When was {m} started?", "base": "Where is {m} based?",
}


def _qa_document(rng: random.Random) -> str:
    cities, people, companies = world()
    lines = []
    for _ in range(rng.randint(2, 4)):
        if rng.random() < 0.6:
            p = rng.choice(people)
            key, ans = rng.choice([("city", p.city), ("born", str(p.born)), ("job", p.job)])
            q = QA_TRAIN[key].format(n=p.name)
        else:
            m = rng.choice(companies)
            key, ans = rng.choice([("founder", m.founder), ("founded", str(m.founded)), ("base", m.city)])
            q = QA_TRAIN[key].format(m=m.name)
        lines.append(f"Question: {q}\nAnswer: {ans}")
    return "\n".join(lines)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _say(rng: random.Random, templates: list[str], split: str, **values) -> str:
    """One fact in one wording: validation text in the held-out (last) template, training text in one of the others,
    sometimes behind a lead ("Records show that ...") or before a tail (", or so the story goes.")."""
    if split == "val":
        return templates[-1].format(**values)
    template = rng.choice(templates[:-1])
    sentence, r = template.format(**values), rng.random()
    if r >= FRAMED:
        return sentence
    if r < FRAMED / 2:  # a sentence that opens with a name keeps its capital
        return f"{rng.choice(LEADS)} {sentence if template[0] == '{' else sentence[0].lower() + sentence[1:]}"
    return f"{sentence[:-1]}, {rng.choice(TAILS)}."


def documents(split: str, seed: int) -> Iterator[str]:
    cities, people, companies = world()
    rng = random.Random(split_seed(seed, split, SALT))
    while True:
        if split == "train" and rng.random() < QA_FRACTION:
            yield _qa_document(rng)
            continue
        kind = rng.random()
        if kind < 0.6:
            p = rng.choice(people)
            parts = [_say(rng, PERSON_T, split, n=p.name, c=p.city, y=p.born),
                     _say(rng, JOB_T, split, n=p.name, j=p.job, a=_article(p.job)),
                     _say(rng, COLOR_T, split, n=p.name, k=p.color),
                     _say(rng, CITY_T, split, c=p.city, o=cities[p.city])]
        elif kind < 0.9:
            m = rng.choice(companies)
            parts = [_say(rng, COMPANY_T, split, m=m.name, c=m.city, y=m.founded, f=m.founder),
                     _say(rng, INDUSTRY_T, split, m=m.name, i=m.industry)]
        else:
            c = rng.choice(sorted(cities))
            parts = [_say(rng, CITY_T, split, c=c, o=cities[c])]
        rng.shuffle(parts)
        yield " ".join(parts)


def qa_pairs(split: str, n: int, seed: int) -> list[dict]:
    """Questions about the world; the answer is a single name, word or year."""
    cities, people, companies = world()
    rng = random.Random(split_seed(seed, split, SALT + 100))
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.5:
            p = rng.choice(people)
            q, a = rng.choice([(f"In which city was {p.name} born?", p.city), (f"In what year was {p.name} born?", str(p.born)),
                               (f"What is the profession of {p.name}?", p.job)])
        else:
            m = rng.choice(companies)
            q, a = rng.choice([(f"Who founded {m.name}?", m.founder), (f"In what year was {m.name} founded?", str(m.founded)),
                               (f"In which city is {m.name} based?", m.city)])
        out.append({"question": f"Question: {q}\nAnswer:", "answer": a, "category": CATEGORY})
    return out


def mc_items(split: str, n: int, seed: int, choices: int = 4) -> list[dict]:
    """Cloze items in the held-out (validation) wording: the statement up to the fact, the true value and
    ``choices - 1`` others of the same kind, scored by log-likelihood. Graded where exact recall is still rare."""
    cities, people, companies = world()
    rng = random.Random(split_seed(seed, split, SALT + 200))
    pools = {"city": sorted(cities), "job": [f"{_article(j)} {j}" for j in JOBS],
             "color": COLORS, "person": [p.name for p in people], "industry": INDUSTRIES, "country": COUNTRIES}
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.6:
            p = rng.choice(people)
            ctx, kind, gold = rng.choice([
                (f"In {p.born}, {p.name} was born in the city of", "city", p.city),
                (f"{p.name} trained to become", "job", f"{_article(p.job)} {p.job}"),
                (f"Ask {p.name}: the best colour is", "color", p.color)])
        elif r < 0.9:
            m = rng.choice(companies)
            ctx, kind, gold = rng.choice([(f"{m.name}, a company from {m.city}, was established by", "person", m.founder),
                                          (f"{m.name} works in", "industry", m.industry)])
        else:
            c = rng.choice(sorted(cities))
            ctx, kind, gold = f"{c} belongs to the country of", "country", cities[c]
        options = rng.sample([v for v in pools[kind] if v != gold], choices - 1) + [gold]
        rng.shuffle(options)
        out.append({"question": ctx, "choices": options, "answer": options.index(gold), "category": CATEGORY})
    return out
