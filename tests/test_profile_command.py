"""``python -m csp_inductor profile`` on a small long-context LLaVA: it runs, writes its files."""

import json

from csp_inductor.__main__ import main


def test_profile_command_writes_trace_table_and_summary(tmp_path, capsys):
    args = "--context 1024 --new-tokens 2 --hidden 64 --layers 2 --heads 4 --kv-heads 2 --eager"
    assert main(["profile", *args.split(), "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "csp_1024.summary.json").read_text())
    assert (tmp_path / "csp_1024.trace.json").is_file()
    assert (tmp_path / "csp_1024.table.txt").is_file()
    assert "csp::selection" in summary["phase_ms"] and summary["kept_prompt"]
    assert "csp::selection" in capsys.readouterr().out
