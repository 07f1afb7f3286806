"""`tte doctor` on this machine: a readable report, exit 0; a kernel forced onto a broken path makes
it exit 1 and name the check that failed."""
import json

import pytest

from unified_tte.errors import RUN_FAILED
from unified_tte.tools.doctor import doctor_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_doctor_reports_versions_devices_and_a_passing_self_test(tmp_path, capsys):
    assert doctor_main(["--device", "cpu", "--json", str(tmp_path / "doctor.json")]) == 0
    out = capsys.readouterr().out
    for section in ("versions", "devices", "self-test on cpu"):
        assert f"\n{section}\n" in out
    for line in ("torch ", "transformers ", "peft ", "deepspeed ", "triton ", "flash-attn ", "deepspeed precompiled ops"):
        assert f"\n  {line}" in out, line
    assert out.strip().splitlines()[-1].startswith("tte doctor: OK: ")
    report = json.loads((tmp_path / "doctor.json").read_text())
    names = {c["name"] for c in report["checks"]}
    assert {"kernel info_nce/hard_negatives chunked float32", "kernel pool/mean chunked bfloat16",
            "forward: fast path == recompute (fp32)"} <= names
    assert all(c["ok"] for c in report["checks"]) and report["exit_code"] == 0


def test_doctor_names_a_broken_kernel_and_exits_1(monkeypatch, capsys):
    import tte_kernels.infonce as infonce

    chunked = infonce.info_nce_chunked
    monkeypatch.setattr(infonce, "info_nce_chunked", lambda *a, **k: chunked(*a, **k) * 1.01)  # 1% off
    assert doctor_main(["--device", "cpu"]) == RUN_FAILED
    out = capsys.readouterr().out
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("tte doctor: FAILED: 4 of ")
    assert "kernel info_nce/hard_negatives chunked float32" in verdict
    assert "kernel pool/last chunked float32" not in verdict
    assert "FAIL  kernel info_nce/padding_rows_symmetric chunked bfloat16" in out
