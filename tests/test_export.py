"""Export and loading: what is exported is what is loaded back (fp32 bit-exact, bf16 cosine >= 0.999),
the think adapter is a plain PEFT adapter, and a damaged checkpoint or wrong base is refused by name."""
import json
import shutil

import pytest
import torch

from unified_tte import TTEInput, UnifiedTTE
from unified_tte.model.backbones import weight_hash
from unified_tte.export import (CheckpointError, export_main, export_model, export_run, load_checkpoint,
                                prepare_base)
from unified_tte.model.inputs import left_pad, stack_images
from unified_tte.model.zoo import tiny_llama, tiny_qwen2vl
from unified_tte.testing import randomize_adapters, solid_image, until_stop

pytestmark = pytest.mark.usefixtures("one_torch_thread")


BUILDERS = {"tiny": tiny_qwen2vl, "tiny-llama": tiny_llama}


def inputs(spec):
    if spec == "tiny":
        return [TTEInput("Which digit is shown?", [solid_image(56, 56)]),
                TTEInput("Describe the number seven in a few careful and exact words.")]
    return [TTEInput("Which digit is shown?"), TTEInput("Describe the number seven in a few careful words.")]


TRACES = ["<think>it is a three</think> three", "<think>seven, so eight</think> eight"]


def trained(spec="tiny", **config):
    tte = UnifiedTTE(BUILDERS[spec](), **{"mode": "activated", "embed_layers": 2, **config})
    randomize_adapters(tte, std=0.15, seed=1)
    return tte


def fresh_base(spec="tiny", seed=0):
    return BUILDERS[spec](seed=seed)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One trained tiny Qwen2-VL and its fp32 export, shared by the tests that only read it."""
    tte = trained()
    out = export_model(tte, tmp_path_factory.mktemp("ckpt") / "tiny", backbone_spec="tiny")
    return tte, out


def copy_ckpt(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("spec,mode", [("tiny", "activated"), ("tiny-llama", "top_k")])
def test_fp32_round_trip_is_bit_exact(tmp_path, spec, mode):
    tte = trained(spec, mode=mode)
    out = export_model(tte, tmp_path / "ck", dtype="fp32", backbone_spec=spec)
    loaded = load_checkpoint(out, backbone=fresh_base(spec))
    assert loaded.config.to_dict() == tte.config.to_dict()
    x = inputs(spec)
    assert torch.equal(loaded.embed(x, TRACES), tte.embed(x, TRACES))
    assert torch.equal(loaded.embed(x), tte.embed(x))
    emb, traces = loaded.think_then_embed(x, max_new_tokens=6)
    emb0, traces0 = tte.think_then_embed(x, max_new_tokens=6)
    assert [t.token_ids for t in traces] == [t.token_ids for t in traces0]
    assert torch.equal(emb, emb0)


def test_bf16_export_keeps_cosine_above_0999(exported, tmp_path):
    tte, _ = exported
    out = export_model(tte, tmp_path / "bf16", dtype="bf16", backbone_spec="tiny")
    stored = json.loads((out / "tte_config.json").read_text())
    assert stored["dtype"] == "bf16"
    from safetensors import safe_open
    with safe_open(str(out / "embed/adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    loaded = load_checkpoint(out)  # base rebuilt from the recorded spec "tiny"
    x = inputs("tiny")
    cos = (loaded.embed(x, TRACES) * tte.embed(x, TRACES)).sum(-1)
    assert cos.min() >= 0.999


def test_bf16_is_at_most_half_the_size_of_fp32(exported, tmp_path):
    tte, out32 = exported
    out16 = export_model(tte, tmp_path / "bf16", dtype="bf16")
    size = lambda d, f: (d / f).stat().st_size  # noqa: E731
    for f in ("think/adapter_model.safetensors", "embed/adapter_model.safetensors"):
        assert size(out16, f) < 0.55 * size(out32, f)


@pytest.mark.parametrize("mode", ["activated", "top_k"])
def test_merged_think_serves_the_same_model(tmp_path, mode):
    tte = trained(mode=mode)
    out = export_model(tte, tmp_path / "merged", merge_think=True, backbone_spec="tiny")
    assert not (out / "think").exists() and (out / "merged/model.safetensors").is_file()
    info = json.loads((out / "tte_config.json").read_text())
    assert info["think_merged"] and info["think"] == "none"
    assert info["merged_weight_hash"] != info["base_weight_hash"]
    loaded = load_checkpoint(out, backbone=fresh_base())
    assert loaded.config.think == "none" and not loaded.adapter_params("think")
    x = inputs("tiny")
    emb, traces = loaded.think_then_embed(x, max_new_tokens=6)
    emb0, traces0 = tte.think_then_embed(x, max_new_tokens=6)
    assert [t.token_ids for t in traces] == [t.token_ids for t in traces0]
    assert (emb - emb0).abs().max() <= 1e-5  # (W + BA)x vs Wx + B(Ax): rounding only
    assert (loaded.embed(x, TRACES) - tte.embed(x, TRACES)).abs().max() <= 1e-5


def test_merge_think_needs_a_think_adapter(tmp_path):
    tte = trained(think="none")
    with pytest.raises(ValueError, match="think='none'"):
        export_model(tte, tmp_path / "x", merge_think=True)
    out = export_model(tte, tmp_path / "x")  # think="none" exports the embed adapter only
    assert not (out / "think").exists()
    assert torch.equal(load_checkpoint(out, backbone=fresh_base()).embed(inputs("tiny"), TRACES),
                       tte.embed(inputs("tiny"), TRACES))


def test_think_adapter_loads_in_plain_peft_and_generates_the_same_tokens(exported):
    from peft import PeftModel

    tte, out = exported
    x = inputs("tiny")
    traces = tte.think(x, max_new_tokens=10).traces
    # A second base built the same way, given the invocation rows the documented way. The head is
    # tied to the embeddings, so the invocation row takes part in generation even from the prompt alone.
    base = prepare_base(fresh_base(), out)
    assert weight_hash(base.model) == json.loads((out / "tte_config.json").read_text())["base_weight_hash"]
    plain = PeftModel.from_pretrained(base.model, str(out / "think")).eval()
    prompts = tte.encoder.encode(x)
    ids, mask = left_pad([p.ids for p in prompts], tte.pad_id)
    pixel_values, grid = stack_images(prompts)
    generated = plain.generate(input_ids=ids, attention_mask=mask, pixel_values=pixel_values,
                               image_grid_thw=grid, mm_token_type_ids=(ids == base.model.config.image_token_id).int(),
                               max_new_tokens=10, do_sample=False, eos_token_id=sorted(tte.stop_ids),
                               pad_token_id=tte.pad_id)[:, ids.shape[1]:]
    for row, trace in enumerate(traces):
        assert trace.token_ids == until_stop(generated[row].tolist(), tte.stop_ids)


def test_prepare_base_applies_merged_weights(tmp_path):
    tte = trained()
    out = export_model(tte, tmp_path / "merged", merge_think=True)
    base = prepare_base(fresh_base(), out)
    info = json.loads((out / "tte_config.json").read_text())
    assert weight_hash(base.model) == info["merged_weight_hash"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("target", ["embed/adapter_model.safetensors", "think/adapter_config.json",
                                    "tte_config.json"])
def test_a_damaged_file_is_refused_by_name(exported, tmp_path, damage, target):
    ckpt = copy_ckpt(exported[1], tmp_path)
    path = ckpt / target
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) - 7]))
    else:
        path.unlink()
    with pytest.raises(CheckpointError, match=target.replace("/", ".")) as err:
        load_checkpoint(ckpt, backbone=fresh_base())
    assert {"flip": "altered", "truncate": "truncated", "delete": "missing"}[damage] in str(err.value)


def test_a_missing_manifest_is_refused(exported, tmp_path):
    ckpt = copy_ckpt(exported[1], tmp_path)
    (ckpt / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        load_checkpoint(ckpt, backbone=fresh_base())


@pytest.mark.parametrize("name", ["think/adapter_model.bin", "pytorch_model.bin", "extra.pt"])
def test_pickle_files_are_refused(exported, tmp_path, name):
    ckpt = copy_ckpt(exported[1], tmp_path)
    torch.save({"x": torch.zeros(1)}, ckpt / name)
    with pytest.raises(CheckpointError, match=f"{name.replace('/', '.')}: pickle files are refused"):
        load_checkpoint(ckpt, backbone=fresh_base())


def test_a_different_base_model_is_refused(exported):
    with pytest.raises(CheckpointError, match="weight hash .* differs .*tte_config.json.*tiny-qwen2vl"):
        load_checkpoint(exported[1], backbone=fresh_base(seed=1))


def test_a_base_in_another_dtype_is_refused_with_a_hint(exported):
    base = fresh_base()
    base.model.to(torch.bfloat16)
    with pytest.raises(CheckpointError, match="bfloat16 but was float32 at export"):
        load_checkpoint(exported[1], backbone=base)
    loaded = load_checkpoint(exported[1], backbone=fresh_base(), dtype=torch.bfloat16)  # cast after the check
    assert loaded.stack.dtype == torch.bfloat16


def test_a_base_of_another_type_is_refused(exported):
    with pytest.raises(CheckpointError, match="records a 'qwen2_vl' base"):
        load_checkpoint(exported[1], backbone=tiny_llama())


def test_export_refuses_to_overwrite_a_folder_that_is_not_a_checkpoint(exported, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        export_model(exported[0], tmp_path / "mine")
    export_model(exported[0], tmp_path / "ck")
    export_model(exported[0], tmp_path / "ck")  # a previous checkpoint is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "mine"]


def write_run(tte, run_dir, spec="tiny"):
    """A run dir as the training helper writes it: PEFT's save_pretrained + tte_config.json."""
    tte.peft_model.save_pretrained(str(run_dir), selected_adapters=tte.embed_adapters, save_embedding_layers=False)
    (run_dir / "tte_config.json").write_text(json.dumps({**tte.config.to_dict(), "backbone": spec}))
    return run_dir


def test_export_run_reads_a_training_run_dir(exported, tmp_path):
    tte = trained(mode="top_k")
    run = write_run(tte, tmp_path / "run")
    out = export_run(run, tmp_path / "ck", dtype="fp32")
    loaded = load_checkpoint(out)
    assert loaded.config.mode == "top_k"
    assert torch.equal(loaded.embed(inputs("tiny"), TRACES), tte.embed(inputs("tiny"), TRACES))


@pytest.mark.parametrize("missing", ["tte_config.json", "think/adapter_model.safetensors",
                                     "embed/adapter_config.json"])
def test_export_run_names_a_missing_file(exported, tmp_path, missing, capsys):
    run = write_run(exported[0], tmp_path / "run")
    (run / missing).unlink()
    with pytest.raises(CheckpointError, match=f"{missing.replace('/', '.')} is missing"):
        export_run(run, tmp_path / "ck")
    assert export_main([str(run), "--out", str(tmp_path / "ck")]) == 2  # bad input
    assert missing in capsys.readouterr().err


def test_export_cli_writes_a_merged_bf16_checkpoint(exported, tmp_path, capsys):
    run = write_run(exported[0], tmp_path / "run")
    out = tmp_path / "checkpoints" / "digits"
    assert export_main([str(run), "--out", str(out), "--dtype", "bf16", "--merge-think"]) == 0
    assert "merged/model.safetensors" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["embed/adapter_config.json", "embed/adapter_model.safetensors",
                                         "merged/model.safetensors", "tte_config.json"]
    loaded = load_checkpoint(out)
    x = inputs("tiny")
    cos = (loaded.embed(x, TRACES) * exported[0].embed(x, TRACES)).sum(-1)
    assert cos.min() >= 0.999


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_export_never_deletes_files_it_did_not_write(exported, tmp_path):
    tte = exported[0]
    out = tmp_path / "ck"
    export_model(tte, out, backbone_spec="tiny")
    (out / "NOTES.md").write_text("my notes about this checkpoint")
    (out / "eval").mkdir()
    (out / "eval" / "results.json").write_text("{}")
    before = snapshot(out)
    with pytest.raises(CheckpointError, match="holds files that export did not write.*--overwrite"):
        export_model(tte, out, backbone_spec="tiny", merge_think=True)
    assert snapshot(out) == before                       # refused: nothing touched
    export_model(tte, out, backbone_spec="tiny", merge_think=True, overwrite=True)
    after = snapshot(out)
    assert after["NOTES.md"] == before["NOTES.md"] and after["eval/results.json"] == b"{}"
    assert "merged/model.safetensors" in after and not (out / "think").exists()  # stale think/ went
    with pytest.warns(UserWarning, match="ignored"):  # the user's files are not part of the checkpoint
        loaded = load_checkpoint(out)
    assert loaded.config.think == "none"


def test_export_refuses_a_file_as_the_output_folder(exported, tmp_path):
    target = tmp_path / "a_file"
    target.write_text("keep")
    with pytest.raises(CheckpointError, match="is a file"):
        export_model(exported[0], target, backbone_spec="tiny")
    assert target.read_text() == "keep"


def test_a_signed_checkpoint_is_verified_with_the_key(exported, tmp_path, monkeypatch):
    monkeypatch.setenv("TTE_CHECKPOINT_KEY", "s3cret")
    out = export_model(exported[0], tmp_path / "signed", backbone_spec="tiny")
    assert (out / "manifest.sig").is_file()
    load_checkpoint(out)
    # Someone rewrites a file and its manifest entry consistently: the sha256 check passes,
    # the signature does not.
    cfg = json.loads((out / "tte_config.json").read_text())
    cfg["pooling"] = "mean"
    (out / "tte_config.json").write_text(json.dumps(cfg))
    from unified_tte.model.checkpoint import write_manifest
    write_manifest(out)
    with pytest.raises(CheckpointError, match="signature does not match"):
        load_checkpoint(out)
    monkeypatch.setenv("TTE_CHECKPOINT_KEY", "another key")
    (out / "manifest.sig").unlink()
    with pytest.raises(CheckpointError, match="manifest.sig is missing"):
        load_checkpoint(out)
    monkeypatch.delenv("TTE_CHECKPOINT_KEY")
    assert load_checkpoint(out).config.pooling == "mean"   # without a key: the sha256 check only
