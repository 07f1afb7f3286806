"""The built-in `digits` task: scikit-learn's 1797 real handwritten digits (8x8, shipped inside
scikit-learn, no download) turned into MMEB-style train rows and eval tasks, some of which need a
reasoning step, with a rule-based teacher that writes the ECR traces for train.

    from unified_tte.data.digits import build_digits
    task = build_digits(seed=0)          # .train_rows (with .trace), .eval_tasks
    python -m unified_tte.data.digits         # prints the sizes and a few rows

Sub-tasks (each has train rows and one eval task, named "digits/<sub-task>"):

| sub-task      | group | query -> target                                   | reasoning |
|---------------|-------|---------------------------------------------------|-----------|
| classify      | I2T   | digit image -> "the digit seven"                  | no        |
| plus_two      | I2T   | digit image -> the number two more ("the number nine") | yes  |
| double_last   | I2T   | digit image -> last digit of twice it ("the digit four") | yes |
| next_number   | T2I   | "the number after seven" -> an image of an 8      | yes       |
| same_digit    | I2I   | digit image -> another image of the same digit    | no        |

Every eval query has 10 candidates: all ten possible answer texts (I2T), or one test image per
class (T2I, I2I). The split is by image (stratified by class, seeded): train rows use only train
images, eval queries and candidates only test images. The split depends on `seed` and
`test_fraction` only, so train and eval agree whenever those agree.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import require
from ..model.inputs import TTEInput
from .schema import EvalRow, EvalTask, TrainRow

SUBTASKS = ("classify", "plus_two", "double_last", "next_number", "same_digit")
GROUPS = {"classify": "I2T", "plus_two": "I2T", "double_last": "I2T",
          "next_number": "T2I", "same_digit": "I2I"}
NEEDS_REASONING = {"classify": False, "plus_two": True, "double_last": True,
                   "next_number": True, "same_digit": False}
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]
INSTRUCTIONS = {
    "classify": "Which digit is shown in the image?",
    "plus_two": "What number is two more than the digit shown in the image?",
    "double_last": "Double the digit shown in the image. What is the last digit of the result?",
    "same_digit": "Find another handwritten image of the same digit.",
}
NEXT_NUMBER_TEMPLATES = ("Find an image of the number after {w}.",
                         "Retrieve a handwritten digit that is one more than {w}.",
                         "Show the number that comes after {w}.")
IMAGE_CANDIDATE_TEXT = "Represent the given image."   # MMEB's wording for image targets


@dataclass
class DigitsTask:
    """The built-in task: train rows with teacher traces, eval tasks, and the image split."""
    train_rows: list[TrainRow]
    eval_tasks: list[EvalTask]
    train_indices: list[int]          # indices into sklearn.datasets.load_digits()
    test_indices: list[int]
    config: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- the teacher

def answer(subtask: str, digit: int) -> int:
    """The number a query about `digit` asks for."""
    return {"classify": digit, "plus_two": digit + 2, "double_last": (2 * digit) % 10,
            "next_number": digit + 1, "same_digit": digit}[subtask]


def target_text(subtask: str, value: int) -> str:
    """The text of an I2T answer candidate."""
    return f"the number {WORDS[value]}" if subtask == "plus_two" else f"the digit {WORDS[value]}"


def _a(d: int) -> str:
    return f"an {d}" if d == 8 else f"a {d}"


def teacher_trace(subtask: str, digit: int) -> str:
    """The rule-based ECR trace for a query about `digit`: `<think>...</think> answer`, short.
    For next_number `digit` is the number named in the query (the answer is digit + 1)."""
    if subtask not in SUBTASKS:
        raise ValueError(f"unknown digits sub-task {subtask!r}; known: {SUBTASKS}")
    d, w, a = digit, WORDS[digit], answer(subtask, digit)
    shows = f"The image shows {_a(d)}."
    if subtask == "classify":
        think = shows
    elif subtask == "plus_two":
        think = f"{shows} {w.capitalize()} plus two is {WORDS[a]}."
    elif subtask == "double_last":
        think = f"{shows} {w.capitalize()} doubled is {WORDS[2 * d]}, whose last digit is {WORDS[a]}."
    elif subtask == "next_number":
        think = f"The number after {w} is {WORDS[a]}, so the image should show {_a(a)}."
    else:  # same_digit
        think = f"{shows} Look for another handwritten {d}."
    return f"<think>{think}</think> {WORDS[a]}"


# ----------------------------------------------------------------------------- images

def render_digit(pixels: np.ndarray, size: int = 56):
    """An 8x8 sklearn digit (values 0..16) as a `size` x `size` RGB image, dark ink on white.
    Nearest-neighbour upscaling keeps it exact; 56 px with patch 14 and merge 2 is 4 tokens in
    Qwen2-VL."""
    from PIL import Image

    gray = (255 - np.rint(np.asarray(pixels, dtype=np.float64) * (255.0 / 16.0))).astype(np.uint8)
    img = Image.fromarray(gray).resize((size, size), Image.NEAREST).convert("RGB")
    return img


def _load_sklearn_digits():
    datasets = require("sklearn.datasets", "digits", "the built-in digits task (scikit-learn's digits)")
    d = datasets.load_digits()
    return d.images, d.target.astype(int)


def split_indices(labels: np.ndarray, seed: int, test_fraction: float) -> tuple[list[int], list[int]]:
    """Stratified split of image indices into (train, test), sorted; depends only on the args."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=test_fraction, stratify=labels,
                                   random_state=seed)
    return sorted(int(i) for i in train), sorted(int(i) for i in test)


# ----------------------------------------------------------------------------- building

def build_digits(seed: int = 0, image_size: int = 56, test_fraction: float = 0.3,
                 max_train_per_task: int | None = 256, max_eval_per_task: int | None = 100,
                 subtasks=SUBTASKS) -> DigitsTask:
    """Build the digits task. Deterministic for given arguments; each sub-task draws from its own
    random stream, so choosing other sub-tasks or sizes does not change a sub-task's rows beyond
    the cut. `max_*_per_task=None` uses every available image."""
    unknown = set(subtasks) - set(SUBTASKS)
    if unknown:
        raise ValueError(f"unknown digits sub-task(s) {sorted(unknown)}; known: {SUBTASKS}")
    pixels, labels = _load_sklearn_digits()
    train_idx, test_idx = split_indices(labels, seed, test_fraction)
    cache: dict[int, object] = {}

    def image(i: int):
        if i not in cache:
            img = render_digit(pixels[i], image_size)
            img.info["digits_index"] = int(i)   # lets tests and users trace an image to its source
            cache[i] = img
        return cache[i]

    def by_class(indices):
        return {c: [i for i in indices if labels[i] == c] for c in range(10)}

    train_by, test_by = by_class(train_idx), by_class(test_idx)
    train_rows: list[TrainRow] = []
    eval_tasks: list[EvalTask] = []
    for sub in subtasks:
        k = SUBTASKS.index(sub)
        rng_train = np.random.default_rng([seed, k, 0])
        rng_eval = np.random.default_rng([seed, k, 1])
        train_rows += _train_rows(sub, train_idx, train_by, labels, image, rng_train,
                                  max_train_per_task)
        eval_tasks.append(EvalTask(
            name=f"digits/{sub}", modality_group=GROUPS[sub],
            rows=_eval_rows(sub, test_idx, test_by, labels, image, rng_eval, max_eval_per_task),
            needs_reasoning=NEEDS_REASONING[sub], task_type=f"digits/{sub}"))
    config = dict(seed=seed, image_size=image_size, test_fraction=test_fraction,
                  max_train_per_task=max_train_per_task, max_eval_per_task=max_eval_per_task,
                  subtasks=list(subtasks))
    return DigitsTask(train_rows, eval_tasks, train_idx, test_idx, config)


def _cap(items, n):
    return items if n is None else items[:n]


def _other(rng, c: int, lo: int = 0, hi: int = 10) -> int:
    """A random value in [lo, hi) other than c."""
    v = int(rng.integers(lo, hi - 1))
    return v + 1 if v >= c else v


def _train_rows(sub, indices, by, labels, image, rng, cap) -> list[TrainRow]:
    rows = []
    order = [int(i) for i in rng.permutation(indices)]
    if sub == "next_number":
        # Positives are images of 1..9; the query names the digit before. The hard negative is
        # an image of the digit the query names: the answer a model gives without the +1 step.
        order = [i for i in order if labels[i] >= 1]
        for n, i in enumerate(_cap(order, cap)):
            a = int(labels[i])
            d = a - 1
            template = NEXT_NUMBER_TEMPLATES[int(rng.integers(len(NEXT_NUMBER_TEMPLATES)))]
            neg = int(rng.choice(by[d]))
            rows.append(TrainRow(
                id=f"digits/{sub}/train/{n}", task=f"digits/{sub}",
                qry=TTEInput(text=template.format(w=WORDS[d])),
                pos=TTEInput(text=IMAGE_CANDIDATE_TEXT, images=[image(i)]),
                neg=TTEInput(text=IMAGE_CANDIDATE_TEXT, images=[image(neg)]),
                trace=teacher_trace(sub, d),
                meta={"digit": d, "answer": a, "image_indices": [i, neg]}))
        return rows
    for n, i in enumerate(_cap(order, cap)):
        d = int(labels[i])
        qry = TTEInput(text=INSTRUCTIONS[sub], images=[image(i)])
        if sub == "same_digit":
            others = [j for j in by[d] if j != i]
            pos_i = int(rng.choice(others))
            neg_i = int(rng.choice(by[_other(rng, d)]))
            pos = TTEInput(text=IMAGE_CANDIDATE_TEXT, images=[image(pos_i)])
            neg = TTEInput(text=IMAGE_CANDIDATE_TEXT, images=[image(neg_i)])
            used = [i, pos_i, neg_i]
        else:
            a = answer(sub, d)
            lo, hi = (2, 12) if sub == "plus_two" else (0, 10)
            pos = TTEInput(text=target_text(sub, a))
            neg = TTEInput(text=target_text(sub, _other(rng, a - lo, 0, hi - lo) + lo))
            used = [i]
        rows.append(TrainRow(id=f"digits/{sub}/train/{n}", task=f"digits/{sub}", qry=qry,
                             pos=pos, neg=neg, trace=teacher_trace(sub, d),
                             meta={"digit": d, "answer": answer(sub, d), "image_indices": used}))
    return rows


def _eval_rows(sub, indices, by, labels, image, rng, cap) -> list[EvalRow]:
    rows = []
    order = [int(i) for i in rng.permutation(indices)]
    if sub in ("classify", "plus_two", "double_last"):
        # All ten possible answers, in a fixed order, for every query (as MMEB's classification
        # tasks list every class). double_last has five reachable answers; the odd digits stay
        # as distractors so there are ten candidates, and they share wording with classify.
        values = range(2, 12) if sub == "plus_two" else range(10)
        cands = [TTEInput(text=target_text(sub, v)) for v in values]
        for n, i in enumerate(_cap(order, cap)):
            d = int(labels[i])
            rows.append(EvalRow(id=f"digits/{sub}/test/{n}",
                                query=TTEInput(text=INSTRUCTIONS[sub], images=[image(i)]),
                                candidates=cands, positive=list(values).index(answer(sub, d)),
                                meta={"digit": d, "answer": answer(sub, d), "image_indices": [i],
                                      **_eval_meta(sub, d)}))
        return rows
    if sub == "next_number":
        order = [i for i in order if labels[i] >= 1]
    for n, i in enumerate(_cap(order, cap)):
        # i is the positive (next_number) or the query image (same_digit); every other class
        # gets one random test image, so there is exactly one image per class.
        c = int(labels[i])
        if sub == "next_number":
            template = NEXT_NUMBER_TEMPLATES[int(rng.integers(len(NEXT_NUMBER_TEMPLATES)))]
            query = TTEInput(text=template.format(w=WORDS[c - 1]))
            pos_i, query_indices = i, []
        else:
            query = TTEInput(text=INSTRUCTIONS[sub], images=[image(i)])
            pos_i, query_indices = int(rng.choice([j for j in by[c] if j != i])), [i]
        cand_idx = [pos_i if k == c else int(rng.choice(by[k])) for k in range(10)]
        rows.append(EvalRow(
            id=f"digits/{sub}/test/{n}", query=query,
            candidates=[TTEInput(text=IMAGE_CANDIDATE_TEXT, images=[image(j)]) for j in cand_idx],
            positive=c,
            meta={"digit": c - 1 if sub == "next_number" else c, "answer": c,
                  "image_indices": query_indices + cand_idx,
                  **_eval_meta(sub, c - 1 if sub == "next_number" else c)}))
    return rows


def _eval_meta(sub: str, digit: int) -> dict:
    """What an eval row carries to score a reasoner: the answer a trace should end in, and the
    teacher's trace (embedding with it is an upper bound on what a reasoner's trace can give)."""
    return {"answer_text": WORDS[answer(sub, digit)], "teacher_trace": teacher_trace(sub, digit)}


def teacher_traces(rows) -> dict[str, str]:
    """`{id: trace}` of rows that carry a teacher trace (the layout `load_traces` returns)."""
    return {r.id: r.trace for r in rows if getattr(r, "trace", None)}


if __name__ == "__main__":
    task = build_digits()
    print(f"images: {len(task.train_indices)} train, {len(task.test_indices)} test")
    for sub in task.config["subtasks"]:
        n = sum(r.task == f"digits/{sub}" for r in task.train_rows)
        t = next(t for t in task.eval_tasks if t.name == f"digits/{sub}")
        print(f"{t.name:22s} {t.modality_group}  train {n:4d}  eval {len(t.rows):4d} queries x "
              f"{len(t.rows[0].candidates)} candidates  reasoning={t.needs_reasoning}")
    for r in task.train_rows[::max(1, len(task.train_rows) // 5)]:
        print(f"  {r.id}: {r.qry.text!r} -> {r.trace}")
