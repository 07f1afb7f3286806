"""MMEB as released: rows written in the public layouts (Hugging Face parquet subsets of
MMEB-train, MMEB-eval V1, MMEB-V2 image with instructions, a V2 video task with frame folders,
a visdoc corpus with graded qrels) load with distinct ids, join only to their own traces, and
score as MMEB scores them; bad files fail naming file, row and field."""
import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from unified_tte.data import DataError, load_eval_task, load_train_rows, resolve_tasks
from unified_tte.data.registry import LABEL_SETS, SUITES, load_registry
from unified_tte.data.traces import ecr_prompt, join_traces
from unified_tte.eval.evaluate import evaluate_model, format_table
from unified_tte.model.inputs import Trace, TTEInput
from unified_tte.tracegen import generate_traces

SHARD = "original-00000-of-00001.parquet"
TEST_SHARD = "test-00000-of-00001.parquet"


def write_parquet(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in records for k in r))
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in records]), path)
    return path


def image(path: Path, color="white", size=(8, 8)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return str(path)


@pytest.fixture
def mmeb_train(tmp_path):
    """Two MMEB-train subsets in the Hugging Face layout; image paths relative to the root."""
    root = tmp_path / "MMEB-train"
    for name in ("ImageNet_1K/n01.jpg", "ImageNet_1K/n02.jpg", "OK-VQA/q1.jpg"):
        image(root / "images" / name)
    write_parquet(root / "ImageNet_1K" / SHARD, [
        {"qry": "<|image_1|>\nRepresent the given image for classification", "qry_image_path": f"images/ImageNet_1K/n0{i}.jpg",
         "pos_text": label, "pos_image_path": "", "neg_text": "", "neg_image_path": ""}
        for i, label in ((1, "tench"), (2, "goldfish"))])
    write_parquet(root / "OK-VQA" / SHARD, [
        {"qry": "<|image_1|>\nRepresent the given image with the following question: what is it?",
         "qry_image_path": "images/OK-VQA/q1.jpg", "pos_text": "a boat", "pos_image_path": "",
         "neg_text": "", "neg_image_path": ""}])
    return root


def test_hf_subsets_give_distinct_ids_their_subset_as_task_and_its_prompt(mmeb_train):
    rows = load_train_rows(mmeb_train)
    assert [r.id for r in rows] == ["ImageNet_1K:0", "ImageNet_1K:1", "OK-VQA:0"]
    assert [r.task for r in rows] == ["ImageNet_1K", "ImageNet_1K", "OK-VQA"]
    assert rows[0].qry.images == [str(mmeb_train / "images/ImageNet_1K/n01.jpg")]
    assert rows[0].qry.text == "Represent the given image for classification"
    assert ecr_prompt(rows[0].task) != ecr_prompt(rows[2].task)       # classification vs qa prompt
    # The same rows from a list of subset folders, and from the shard files themselves
    again = load_train_rows([mmeb_train / "OK-VQA" / SHARD, mmeb_train / "ImageNet_1K"])
    assert sorted(r.id for r in again) == sorted(r.id for r in rows)


def test_ids_repeated_across_subsets_are_an_error(tmp_path):
    for sub in ("A", "B"):
        write_parquet(tmp_path / sub / SHARD, [{"id": "7", "qry": "q", "qry_image_path": "",
                                                "pos_text": "p", "pos_image_path": ""}])
    with pytest.raises(DataError, match=r"B/original-00000-of-00001.parquet row 0: row id '7' was already used"):
        load_train_rows(tmp_path)


class FakeReasoner:
    def think(self, inputs, max_new_tokens=128, do_sample=False):
        return SimpleNamespace(traces=[Trace(f"<think>{x.text[:10]}</think> ok", [], True) for x in inputs])


def test_traces_join_only_to_the_rows_they_were_written_for(mmeb_train, tmp_path):
    rows = load_train_rows(mmeb_train)
    out = tmp_path / "traces.jsonl"
    generate_traces(FakeReasoner(), rows, out, progress=False)
    assert all("fp" in json.loads(line) for line in out.read_text().splitlines())
    joined = join_traces(load_train_rows(mmeb_train), [out], missing="error")
    assert all(r.trace and r.trace.endswith("ok") for r in joined)

    # Written for the old layout (ids "<file stem>:<row>"): no id is a row of this data.
    old = tmp_path / "old.jsonl"
    old.write_text("".join(json.dumps({"id": f"original-00000-of-00001:{i}", "trace": "<think>x</think> y"}) + "\n"
                           for i in range(3)))
    with pytest.raises(DataError, match=r"old\.jsonl: none of its 3 trace ids is a row of the data.*'original-00000"):
        join_traces(load_train_rows(mmeb_train), [old])

    # Same ids, other rows (e.g. another dataset's ImageNet_1K): the fingerprints differ.
    other = tmp_path / "other"
    write_parquet(other / "ImageNet_1K" / SHARD, [{"qry": "another query", "qry_image_path": "",
                                                   "pos_text": "p", "pos_image_path": ""}])
    with pytest.raises(DataError, match=r"traces\.jsonl line 1: field 'fp': the trace for id 'ImageNet_1K:0' "
                                        r"was written for another query"):
        join_traces(load_train_rows(other), [out])


# ----------------------------------------------------------------------------- eval layouts

class ConceptEmbedder:
    """A perfect fake model: an input embeds as the concept it shows, the last word of its text
    for text, the file or folder name for an image or video (`<concept>.png`, `<concept>/`)."""

    def __init__(self):
        self.vocab, self.embedded = {}, 0

    def _concept(self, x):
        if x.videos:
            return Path(str(x.videos[0])).name
        if x.images:
            return Path(str(x.images[0])).stem.split("_")[0]
        return x.text.split()[-1].strip(".?:")

    def embed(self, inputs, traces=None):
        self.embedded += len(inputs)
        out = torch.zeros(len(inputs), 128)
        for i, x in enumerate(inputs):
            out[i, self.vocab.setdefault(self._concept(x), len(self.vocab))] = 1.0
        return out


def test_a_candidate_that_repeats_the_positive_counts_as_the_positive(tmp_path):
    img = image(tmp_path / "crane.png")
    rows = [{"qry_text": "<|image_1|>\nRepresent the given image for classification", "qry_img_path": "crane.png",
             "tgt_text": ["crane", "tench", "crane", "goldfish"], "tgt_img_path": ["", "", "", ""]}]
    task = load_eval_task(write_parquet(tmp_path / "ImageNet-1K" / TEST_SHARD, rows))
    assert task.rows[0].query.images == [img] and task.name == "ImageNet-1K"
    model = ConceptEmbedder()
    m = evaluate_model(model, [task], use_think=False, progress=False)["tasks"]["ImageNet-1K"]
    assert (m["hit@1"], m["ndcg@5"], m["mrr@10"]) == (1.0, 1.0, 1.0)
    assert m["n_distinct_candidates"] == 3 and model.embedded == 1 + 3   # "crane" embedded once


def test_a_registry_page_cap_reaches_every_query_candidate_and_corpus_item_of_its_task(tmp_path, visdoc):
    image(tmp_path / "crane.png")
    rows = [{"qry_text": "<|image_1|>\nRepresent the given image", "qry_img_path": "crane.png",
             "tgt_text": ["crane", "tench"], "tgt_img_path": ["", "crane.png"]}]
    listed = load_eval_task(write_parquet(tmp_path / "ImageNet-1K" / TEST_SHARD, rows), max_pixels=28 * 28 * 64)
    corpus = load_eval_task(visdoc, image_root=tmp_path / "pages", max_pixels=28 * 28 * 64)
    inputs = [listed.rows[0].query, *listed.rows[0].candidates, *(r.query for r in corpus.rows), *corpus.corpus.values()]
    assert {x.max_pixels for x in inputs} == {28 * 28 * 64}
    assert listed.rows[0].query.source == "row ImageNet-1K:0 query"      # still named by its row
    assert load_eval_task(visdoc, image_root=tmp_path / "pages").rows[0].query.max_pixels is None


def test_ties_between_different_candidates_still_count_against_the_positive():
    class Flat:
        def embed(self, inputs, traces=None):
            return torch.ones(len(inputs), 4) / 2
    from unified_tte.data import EvalRow, EvalTask
    task = EvalTask("t", "T2T", [EvalRow("r", TTEInput("q"), [TTEInput("a"), TTEInput("b"), TTEInput("a")], 0)])
    m = evaluate_model(Flat(), [task], use_think=False, progress=False)["tasks"]["t"]
    assert m["hit@1"] == 0.0 and m["mrr"] == 0.5          # "a" (twice) is one candidate, "b" ties above it


def test_v2_image_rows_keep_their_instructions(tmp_path):
    image(tmp_path / "image-tasks" / "cls" / "crane.png")
    rows = [{"qry_inst": "<|image_1|> Represent the given image for classification", "qry_text": "",
             "qry_img_path": "cls/crane.png", "tgt_inst": "Represent the class label:",
             "tgt_text": ["crane", "tench"], "tgt_img_path": ["", ""]}]
    path = write_parquet(tmp_path / "image-tasks" / "ImageNet-1K" / TEST_SHARD, rows)
    task = load_eval_task(path.parent, image_root=tmp_path / "image-tasks")
    assert task.rows[0].query.text == "Represent the given image for classification"
    assert [c.text for c in task.rows[0].candidates] == ["Represent the class label: crane",
                                                         "Represent the class label: tench"]


def test_a_v2_file_missing_a_column_names_file_row_and_column(tmp_path):
    rows = [{"qry_inst": "Represent", "qry_text": "", "qry_img_path": "", "tgt_text": ["a"], "tgt_img_path": [""]}]
    path = write_parquet(tmp_path / "T" / TEST_SHARD, rows)
    with pytest.raises(DataError, match=r"test-00000-of-00001.parquet row 0: an MMEB-V2 image file .* "
                                        r"missing column\(s\) \['tgt_inst'\]"):
        load_eval_task(path.parent)


def test_a_null_candidate_text_with_no_image_names_file_row_and_field(tmp_path):
    rows = [{"qry_text": "what is it?", "qry_img_path": "", "tgt_text": ["crane", "tench"], "tgt_img_path": ["", ""]},
            {"qry_text": "and this?", "qry_img_path": "", "tgt_text": ["crane", None], "tgt_img_path": ["", ""]}]
    path = write_parquet(tmp_path / "T" / TEST_SHARD, rows)
    with pytest.raises(DataError, match=r"test-00000-of-00001.parquet row 1: task 'T' row 'T:1': field 'tgt_text\[1\]' "
                                        r"is null and 'tgt_img_path\[1\]' names no image"):
        load_eval_task(path.parent)
    image(tmp_path / "tench.png")                        # a shard's images are relative to its parent's parent
    rows[1]["tgt_img_path"] = ["", "tench.png"]          # an image-only candidate is fine
    task = load_eval_task(write_parquet(tmp_path / "T" / TEST_SHARD, rows).parent)
    assert task.rows[1].candidates[1].text == "" and task.rows[1].candidates[1].images


def test_a_null_option_of_a_video_qa_row_names_file_row_and_field(tmp_path):
    frames_folder(tmp_path / "frames" / "v1")
    qa = write_parquet(tmp_path / "NExTQA" / TEST_SHARD, [
        {"video": "v1", "question": "what is he doing?", "options": ["swim", None], "answer": "A"}])
    with pytest.raises(DataError, match=r"parquet row 0: field 'options\[1\]' is null"):
        load_eval_task(qa.parent, frame_root=tmp_path / "frames")


def frames_folder(folder: Path, n=3) -> None:
    for i in range(n):
        image(folder / f"{i:04d}.jpg", (40 * i, 0, 0), (28, 28))


@pytest.fixture
def video_root(tmp_path):
    """An MSR-VTT-style task as VLM2Vec reads it: annotations + frames/<video id>/."""
    frames = tmp_path / "video-tasks" / "frames" / "video_ret" / "MSR-VTT"
    for vid in ("video7", "video9", "video11"):
        frames_folder(frames / vid)
    rows = [{"video_id": v, "video": f"{v}.mp4", "caption": f"a man is cooking video{n}"}
            for v, n in (("video7", 7), ("video9", 9), ("video11", 11))]
    write_parquet(tmp_path / "video-tasks" / "MSR-VTT" / "test_1k" / "test-00000-of-00001.parquet", rows)
    return tmp_path


def test_a_video_retrieval_task_ranks_captions_against_every_video(video_root):
    task = load_eval_task(video_root / "video-tasks" / "MSR-VTT" / "test_1k", modality="video",
                          frame_root=video_root / "video-tasks/frames/video_ret/MSR-VTT",
                          qry_inst="Find a video that contains the following visual content:",
                          tgt_inst="Understand the content of the provided video.")
    assert len(task.corpus) == 3 and task.rows[0].relevance == {"video7": 1.0}
    assert task.rows[0].query.text.startswith("Find a video that contains")
    assert task.corpus["video9"].videos == [str(video_root / "video-tasks/frames/video_ret/MSR-VTT/video9")]
    res = evaluate_model(ConceptEmbedder(), [task], use_think=False, progress=False)
    assert res["tasks"]["test_1k"]["hit@1"] == 1.0 and res["mmeb"]["video"]["score"] == 1.0


def test_video_classification_and_qa_layouts(tmp_path):
    frames = tmp_path / "frames"
    for vid in ("v1", "v2"):
        frames_folder(frames / vid)
    cls = write_parquet(tmp_path / "HMDB51" / TEST_SHARD, [{"video_id": "v1", "pos_text": "run"},
                                                            {"video_id": "v2", "pos_text": "jump"}])
    task = load_eval_task(cls.parent, frame_root=frames, labels=["run", "jump", "swim"])
    assert sorted(task.corpus) == ["jump", "run", "swim"] and task.rows[1].relevance == {"jump": 1.0}
    qa = write_parquet(tmp_path / "NExTQA" / TEST_SHARD, [
        {"video": "v1", "question": "what is he doing?", "options": ["swim", "run"], "answer": "B"},
        {"video": "v2", "question": "what next?", "options": ["(A) sit", "(B) jump"], "answer": "jump"}])
    task = load_eval_task(qa.parent, frame_root=frames)
    assert [r.positive for r in task.rows] == [1, 1] and task.rows[0].query.videos


def shipped_labels(name: str) -> list[str]:
    return [line for line in LABEL_SETS[name].read_text().splitlines() if line and not line.startswith("#")]


def hmdb51_suite_task(root: Path, n_rows: int) -> list[str]:
    """An HMDB51 task under an MMEB-V2 data root: n_rows videos, each of another class, its frames
    in a folder named after its class (what ConceptEmbedder sees)."""
    labels = shipped_labels("hmdb51")[:n_rows]
    frames = root / "video-tasks/frames/video_cls/HMDB51"
    for label in labels:
        frames_folder(frames / label, n=1)
    write_parquet(root / "video-tasks" / "HMDB51" / TEST_SHARD,
                  [{"video_id": label, "pos_text": label} for label in labels])
    return labels


def test_a_video_classification_task_ranks_against_its_whole_label_set(tmp_path):
    hmdb51_suite_task(tmp_path, 20)
    (task,) = resolve_tasks("mmeb_v2/HMDB51", data_root=tmp_path)
    assert len(task.rows) == 20 and len(task.corpus) == 51
    m = evaluate_model(ConceptEmbedder(), [task], use_think=False, progress=False)["tasks"]["HMDB51"]
    assert m["n_candidates"] == 51 and m["n_distinct_candidates"] == 51 and m["hit@1"] == 1.0


def test_the_shipped_label_sets_have_the_published_class_counts_and_the_suite_names_them(tmp_path):
    counts = {name: len(shipped_labels(name)) for name in LABEL_SETS}
    assert counts == {"breakfast": 10, "hmdb51": 51, "kinetics700": 700, "smthsmthv2": 174, "ucf101": 101}
    for name in LABEL_SETS:
        assert len(set(shipped_labels(name))) == counts[name], name                 # no class twice
        assert "TIGER-AI-Lab/VLM2Vec" in LABEL_SETS[name].read_text().splitlines()[3]  # the source, cited
    specs = load_registry(SUITES["mmeb_v2"], data_root=tmp_path)
    cls = {n: len(s.labels) for n, s in specs.items() if s.group == "video-classification"}
    assert cls == {"K700": 700, "SmthSmthV2": 174, "HMDB51": 51, "UCF101": 101, "Breakfast": 10}


def test_without_a_label_set_a_video_classification_task_warns_it_ranks_the_labels_seen(tmp_path):
    labels = hmdb51_suite_task(tmp_path, 3)
    with pytest.warns(UserWarning, match=r"rank against the 3 labels seen in"):
        task = load_eval_task(tmp_path / "video-tasks" / "HMDB51", frame_root=tmp_path / "video-tasks/frames/video_cls/HMDB51")
    assert list(task.corpus) == labels
    with pytest.raises(DataError, match=r"label\(s\) \['ride_bike'\] of .* are not among the task's 2 labels"):
        load_eval_task(tmp_path / "video-tasks" / "HMDB51", frame_root=tmp_path / "video-tasks/frames/video_cls/HMDB51",
                       labels=["wave", "dive"])


def test_a_missing_or_unknown_label_set_is_one_clear_error(tmp_path):
    registry = tmp_path / "tasks.yaml"
    registry.write_text("HMDB51:\n  path: video-tasks/HMDB51\n  labels: labels/hmdb51.txt\n")
    with pytest.raises(DataError, match=r"tasks.yaml task 'HMDB51': field 'labels': label-set file .*labels/hmdb51.txt "
                                        r"not found"):
        load_registry(registry)
    registry.write_text("HMDB51:\n  path: video-tasks/HMDB51\n  labels: hmdb52\n")
    with pytest.raises(DataError, match=r"field 'labels': 'hmdb52' is no shipped label set \(breakfast, hmdb51, "):
        load_registry(registry)
    (tmp_path / "mine.txt").write_text("# my classes\nrun\njump\nrun\n")
    registry.write_text("HMDB51:\n  path: video-tasks/HMDB51\n  labels: mine.txt\n")
    with pytest.raises(DataError, match=r"class name\(s\) \['run'\] listed twice"):
        load_registry(registry)


def test_a_video_folder_with_no_frames_names_file_row_and_field(video_root):
    empty = video_root / "video-tasks/frames/video_ret/MSR-VTT/video9"
    for f in empty.iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"test-00000-of-00001.parquet row 1: field 'video_id': video folder .*video9 "
                                        r"holds no frames"):
        load_eval_task(video_root / "video-tasks" / "MSR-VTT" / "test_1k",
                       frame_root=video_root / "video-tasks/frames/video_ret/MSR-VTT")


def png_bytes(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="PNG")
    return buf.getvalue()


def write_visdoc(folder: Path) -> Path:
    """A ViDoRe-style BEIR task: corpus pages stored as image bytes, graded qrels."""
    pages = {"p1": "red", "p2": "blue", "p3": "green", "p4": "red"}      # p4 repeats p1's content
    write_parquet(folder / "corpus" / TEST_SHARD,
                  [{"corpus-id": k, "image": {"bytes": png_bytes(c), "path": None}} for k, c in pages.items()])
    write_parquet(folder / "queries" / TEST_SHARD, [{"query-id": "q1", "query": "which page is red"},
                                                    {"query-id": "q2", "query": "which page is blue"},
                                                    {"query-id": "q3", "query": "no judgement for me"}])
    write_parquet(folder / "qrels" / TEST_SHARD, [{"query-id": "q1", "corpus-id": "p1", "score": 2},
                                                  {"query-id": "q2", "corpus-id": "p2", "score": 2},
                                                  {"query-id": "q2", "corpus-id": "p3", "score": 1}])
    return folder


@pytest.fixture
def visdoc(tmp_path):
    return write_visdoc(tmp_path / "visdoc-tasks" / "docvqa_test_subsampled_beir")


class PixelEmbedder:
    """Pages embed by colour (red, blue, green); a query as the colour it names, the blue one
    also a little green (the partially relevant page second: a perfect model) or, with `swap`,
    more green than blue."""

    def __init__(self, swap=False):
        self.swap = swap

    def embed(self, inputs, traces=None):
        colors = ["red", "blue", "green", "judgement"]
        out = torch.zeros(len(inputs), 8)
        for i, x in enumerate(inputs):
            if x.images:
                rgb = Image.open(x.images[0]).getpixel((0, 0))
                out[i, {0: 0, 2: 1, 1: 2}[max(range(3), key=lambda c: rgb[c])]] = 1.0   # r, b, g
            else:
                word = next(c for c in colors if c in x.text)
                out[i, colors.index(word)] = 1.0
                if word == "blue":
                    out[i, 1:3] = torch.tensor([0.6, 0.8] if self.swap else [0.8, 0.6])
        return out


def test_visdoc_corpus_with_graded_qrels_scores_ndcg_as_mmeb_v2(visdoc, tmp_path):
    task = load_eval_task(visdoc, image_root=tmp_path / "pages", name="ViDoRe_docvqa", modality="visdoc",
                          qry_inst="Find a document image that matches the given query:")
    assert [r.id for r in task.rows] == ["q1", "q2"]                 # q3 has no qrels: not scored
    assert task.rows[1].relevance == {"p2": 2.0, "p3": 1.0} and task.primary == "ndcg@5"
    assert (tmp_path / "pages" / "p1.png").is_file()                 # pages extracted once
    perfect = evaluate_model(PixelEmbedder(), [task], use_think=False, progress=False)
    m = perfect["tasks"]["ViDoRe_docvqa"]
    assert m["ndcg@5"] == 1.0 and m["hit@1"] == 1.0 and m["n_distinct_candidates"] == 3   # p4 == p1
    # q2 ranks p3 (gain 1) above p2 (gain 2): DCG = 1 + 2/log2(3), ideal = 2 + 1/log2(3).
    swapped = evaluate_model(PixelEmbedder(swap=True), [task], use_think=False, progress=False)
    want = (1.0 + (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3))) / 2
    assert swapped["tasks"]["ViDoRe_docvqa"]["ndcg@5"] == pytest.approx(want)
    assert swapped["tasks"]["ViDoRe_docvqa"]["recall@1"] == pytest.approx((1 + 0.5) / 2)
    assert swapped["mmeb"]["visdoc"]["score"] == pytest.approx(want)
    assert "| MMEB |" in format_table(swapped) and "MRR@10" in format_table(swapped)


def test_qrels_naming_an_unknown_corpus_id_names_file_row_and_field(visdoc):
    write_parquet(visdoc / "qrels" / TEST_SHARD, [{"query-id": "q1", "corpus-id": "p1", "score": 1},
                                                  {"query-id": "q1", "corpus-id": "p99", "score": 1}])
    with pytest.raises(DataError, match=r"qrels/test-00000-of-00001.parquet row 1: field 'corpus-id': 'p99' is not in"):
        load_eval_task(visdoc)


def test_a_qrels_pair_judged_twice_keeps_its_highest_grade(visdoc):
    write_parquet(visdoc / "qrels" / TEST_SHARD, [{"query-id": "q2", "corpus-id": "p2", "score": 2},
                                                  {"query-id": "q2", "corpus-id": "p2", "score": 1},
                                                  {"query-id": "q2", "corpus-id": "p3", "score": 1}])
    assert load_eval_task(visdoc).rows[0].relevance == {"p2": 2.0, "p3": 1.0}


def test_the_fixed_visdoc_pages_are_read_and_the_old_release_with_a_warning(tmp_path, recwarn):
    old = write_visdoc(tmp_path / "visdoc-tasks" / "ViDoSeek-page")
    with pytest.warns(UserWarning, match=r"ViDoSeek-page-fixed not found, reading the older release in .*ViDoSeek-page"):
        (task,) = resolve_tasks("mmeb_v2/ViDoSeek-page", data_root=tmp_path)
    assert task.corpus["p1"].images[0].startswith(str(tmp_path / "visdoc-tasks/images/ViDoSeek-page/"))
    old.rename(tmp_path / "visdoc-tasks" / "ViDoSeek-page-fixed")
    recwarn.clear()
    (task,) = resolve_tasks("mmeb_v2/ViDoSeek-page", data_root=tmp_path)
    assert not [w for w in recwarn if "older release" in str(w.message)]
    assert task.corpus["p1"].images[0].startswith(str(tmp_path / "visdoc-tasks/images/ViDoSeek-page-fixed/"))
    assert load_registry(SUITES["mmeb_v2"], data_root=tmp_path)["MMLongBench-page"].path == \
        tmp_path / "visdoc-tasks/MMLongBench-page-fixed"


# ----------------------------------------------------------------------------- suites, image size

def test_the_mmeb_v2_suite_lists_all_78_tasks_with_their_groups(tmp_path):
    specs = load_registry(SUITES["mmeb_v2"], data_root=tmp_path)
    by_modality = {m: [s for s in specs.values() if s.modality == m] for m in ("image", "video", "visdoc")}
    assert len(specs) == 78 and {m: len(v) for m, v in by_modality.items()} == {"image": 36, "video": 18, "visdoc": 24}
    assert specs["MSR-VTT"].frame_root == tmp_path / "video-tasks/frames/video_ret/MSR-VTT"
    assert len(load_registry(SUITES["mmeb_v1"], data_root=tmp_path)) == 36
    with pytest.raises(DataError, match="--data-root"):
        resolve_tasks("mmeb_v2/video", data_root=None)


def test_a_suite_task_resolves_under_the_data_root(tmp_path):
    image(tmp_path / "image-tasks" / "VOC2007" / "cat.png")
    write_parquet(tmp_path / "image-tasks" / "VOC2007" / TEST_SHARD, [
        {"qry_inst": "Represent the given image", "qry_text": "", "qry_img_path": "VOC2007/cat.png",
         "tgt_inst": "", "tgt_text": ["cat", "dog"], "tgt_img_path": ["", ""]}])
    (task,) = resolve_tasks("mmeb_v2/VOC2007", data_root=tmp_path)
    assert task.modality == "image" and task.modality_group == "image-classification"
    res = evaluate_model(ConceptEmbedder(), [task], use_think=False, progress=False)
    assert res["mmeb"]["overall"] == {"score": 1.0, "n_tasks": 1}


def test_a_document_page_stays_under_1300_visual_tokens_with_the_shipped_qwen2vl_recipes():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from unified_tte.model.inputs import PromptEncoder
    from unified_tte.model.zoo import build_tokenizer
    from unified_tte.train.recipe import load_recipe

    repo = Path(__file__).resolve().parents[1]
    # Qwen2-VL-2B-Instruct's own processor setting: up to 12.8M pixels per image.
    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=12845056)
    page = TTEInput("Find the total.", [Image.new("RGB", (1700, 2200), "white")])
    tok = build_tokenizer()
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    default = PromptEncoder(tok, processor, max_length=100_000).encode([page])[0].ids.count(pad)
    assert default > 4000
    for name in ("qwen2vl_2b.yaml", "qwen2vl_7b.yaml"):
        model = load_recipe(repo / "recipes" / name).model
        enc = PromptEncoder(tok, processor, max_length=100_000, max_pixels=model.max_pixels,
                            min_pixels=model.min_pixels)
        assert enc.encode([page])[0].ids.count(pad) <= 1300
        capped = PromptEncoder(tok, processor, max_length=100_000, max_pixels=model.max_pixels)
        per_task = TTEInput(page.text, page.images, max_pixels=28 * 28 * 256)    # a task's override
        assert capped.encode([per_task])[0].ids.count(pad) <= 256
