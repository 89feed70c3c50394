"""bench.export_memory on a tiny model: both exports run in fresh processes, write equal folders, and the result
JSON records the machine, the commit and a peak per export."""

import json

from bench import export_memory


def test_export_memory_benchmark_writes_equal_folders_and_peaks(tmp_path, capsys):
    assert export_memory.main(["--layers", "2", "--hidden", "128", "--shard-mb", "0.2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "export_memory_cpu.json").read_text())
    assert result["benchmark"] == "export_memory" and "commit" in result["git"] and result["machine"]
    (case,) = result["cases"]
    assert case["folders_equal"] and case["files"] > 1  # 0.2 MB files: several
    for mode in ("streamed", "gather"):
        assert case[mode]["peak_mib"] > 0 and case[mode]["seconds"] > 0
    assert "streamed MiB" in capsys.readouterr().out
