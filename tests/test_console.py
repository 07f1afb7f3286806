"""What commands print: third-party progress bars and info logs hidden unless verbose (warnings
still shown), and one progress line per phase (what, how far, elapsed, ETA)."""
import io
import re

import pytest

from unified_tte import console
from unified_tte.testing import third_party_lines


@pytest.fixture
def restore_hf_output(monkeypatch):
    from transformers.utils import logging as hf_logging

    for key in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", console.VERBOSE_ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(console, "_quieted", [])
    yield
    hf_logging.enable_progress_bar()
    hf_logging.set_verbosity_warning()


def save_and_load_tiny(folder):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoModelForCausalLM.from_pretrained(folder)


def test_quiet_hides_hugging_face_bars_and_verbose_shows_them(tmp_path, capfd, caplog, restore_hf_output):
    import logging

    from transformers.utils import logging as hf_logging

    console.quiet_third_party()
    save_and_load_tiny(tmp_path / "quiet")
    quiet = capfd.readouterr()
    assert third_party_lines(quiet.out + quiet.err) == []
    # warnings still show: transformers logs at WARNING, and DeepSpeed's logger lets them through
    assert hf_logging.get_verbosity() == logging.WARNING
    assert logging.getLogger("DeepSpeed").getEffectiveLevel() <= logging.WARNING
    hf_logging.get_logger("transformers.modeling_utils").warning("a warning still shows")
    assert "a warning still shows" in caplog.text
    console.set_verbose()
    save_and_load_tiny(tmp_path / "verbose")
    verbose = capfd.readouterr()
    shown = third_party_lines(verbose.out + verbose.err)
    assert any("Loading weights" in line for line in shown) and any("Writing model shards" in line for line in shown)


def test_quiet_stdout_holds_prints_back_and_replays_them_when_the_block_fails(capfd, monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    with console.quiet_stdout():
        print("DeepSpeed op built successfully")
    assert capfd.readouterr().out == ""
    with pytest.raises(RuntimeError), console.quiet_stdout():
        print("what led to the failure")
        raise RuntimeError("boom")
    assert "what led to the failure" in capfd.readouterr().err


def test_a_phase_in_a_log_file_is_one_line_with_what_how_far_and_its_time():
    stream = io.StringIO()
    phases = console.Phases("demo", total=3, stream=stream)
    with phases.phase("training think", total=40, unit="steps") as bar:
        for _ in range(40):
            bar.update(1)
        bar.note = "loss 2.0 -> 1.0"
    with phases.phase("exporting"):
        pass
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert re.fullmatch(r"\[demo \d\d:\d\d:\d\d\] 1/3 training think: 40/40 steps, 0:00 elapsed; loss 2.0 -> 1.0",
                        lines[0]), lines[0]
    assert re.fullmatch(r"\[demo \d\d:\d\d:\d\d\] 2/3 exporting \(0:00\)", lines[1]), lines[1]


def test_a_running_phase_shows_its_eta():
    bar = console.Progress("train", "think", total=10, unit="steps", stream=io.StringIO())
    bar.started -= 20.0       # 20 s for 4 of 10 steps: 30 s to go
    bar.done = 4
    assert bar.line().endswith("think: 4/10 steps, 0:20 elapsed, ETA 0:30")
    assert "ETA" not in bar.line(final=True)


def test_a_module_that_draws_plain_tqdm_bars_draws_none_inside_the_block(capfd, monkeypatch):
    import sys
    import types

    from tqdm.auto import tqdm

    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    module = types.ModuleType("bars_of_a_library")
    module.tqdm = tqdm
    exec("def work():\n    return sum(1 for _ in tqdm(range(50), desc='Converting and de-quantizing GGUF'))",
         module.__dict__)
    monkeypatch.setitem(sys.modules, "bars_of_a_library", module)
    with console.module_bars_hidden("bars_of_a_library"):
        assert module.work() == 50
    assert third_party_lines(capfd.readouterr().err) == []
    assert module.tqdm is tqdm                           # put back after the block
    module.work()
    assert third_party_lines(capfd.readouterr().err)     # and it draws again
