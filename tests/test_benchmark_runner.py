"""The benchmark runner (python -m fastbb) and the GPU check's bookkeeping, on fake cases: budgets, the
torch.compile pass, rows written as they finish, reruns that keep earlier rows, test results read back."""
import json
import os

import pytest

from fastbb.benchmarks import compare_runs, gpu_check, runner


def _case(name, calls, compile_estimate_s=None, fail=False):
    def provider(tag):
        def run():
            calls.append((name, tag))
            if fail and tag == "fastbb":
                raise RuntimeError("boom")
        return run

    case = {"name": name, "baseline": "eager", "family": "fake",
            "providers": {"eager": provider("eager"), "torch.compile": provider("torch.compile"),
                          "fastbb": provider("fastbb")}}
    if compile_estimate_s is not None:
        case["compile_estimate_s"] = compile_estimate_s
    return case


def test_families_are_found_from_the_case_files():
    assert {"nms", "box_decode", "retinanet_postprocess", "focal_loss", "fpn", "conv_bn_relu"} <= set(
        runner.family_names())
    with pytest.raises(ValueError, match="unknown benchmark families"):
        runner.collect_cases("cpu", families=["no_such_family"])


def test_budget_defers_and_drops_torch_compile(monkeypatch, tmp_path):
    calls = []
    cases = [_case("small", calls, compile_estimate_s=0.0), _case("large", calls, compile_estimate_s=1e6),
             _case("broken", calls, compile_estimate_s=1e6, fail=True)]
    monkeypatch.setattr(runner, "collect_cases", lambda *args: cases)
    written = []
    real_write = runner.write_json
    monkeypatch.setattr(runner, "write_json", lambda report, path: (written.append(len(report["results"])),
                                                                      real_write(report, path)))
    path = tmp_path / "report.json"
    report = runner.run("cpu", min_time=0.0, budget_s=1e5, json_path=str(path), log=lambda line: None)
    rows = {row["name"]: row for row in report["results"]}
    # every non-compile provider ran before any torch.compile provider
    first_compile = next(i for i, call in enumerate(calls) if call[1] == "torch.compile")
    assert all(call[1] != "torch.compile" for call in calls[:first_compile])
    assert {call[0] for call in calls[:first_compile]} == {"small", "large", "broken"}
    assert "compile_s" in rows["small"]["providers"]["torch.compile"]
    assert list(rows["small"]["providers"]) == ["eager", "torch.compile", "fastbb"]  # the case's order
    assert "torch.compile" not in rows["large"]["providers"]
    assert [d["case"] for d in report["dropped"]] == ["large", "broken"]
    assert rows["broken"]["providers"]["fastbb"]["error"] == "RuntimeError: boom"
    assert written[:3] == [1, 2, 3]  # the JSON was rewritten after each row
    assert json.loads(path.read_text())["results"][0]["name"] == "small"
    assert not os.path.exists(f"{path}.partial")


def test_spent_budget_skips_the_remaining_cases(monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "collect_cases", lambda *args: [_case("a", calls), _case("b", calls)])
    report = runner.run("cpu", min_time=0.0, budget_s=0.0, log=lambda line: None)
    assert all("skipped" in row for row in report["results"]) and not calls
    assert "skipped" in runner.format_row(report["results"][0])


def test_exclude_and_representative_select_cases():
    names = [case["name"] for case in runner.collect_cases("cpu", families=["box_decode"])]
    assert names and runner.collect_cases("cpu", families=["box_decode"], exclude=names) == []
    quick = runner.collect_cases("cpu", families=["nms"], representative=True)
    assert [case["name"] for case in quick] == ["nms 20000 boxes", "batched_nms 80 classes 50000 boxes"]


def test_gpu_check_reads_junit_and_killed_logs(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite><testcase classname="t" name="ok"/>'
        '<testcase classname="t" name="bad"><failure message="x"/></testcase>'
        '<testcase classname="t" name="skip"><skipped message="y"/></testcase></testsuite></testsuites>')
    result = gpu_check._test_result(1, str(junit), str(tmp_path / "unused.log"))
    assert result["status"] == "failed" and result["counts"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1}
    assert result["failures"] == ["t::bad"]
    log = tmp_path / "killed.log"
    log.write_text("tests/a.py::t1 PASSED [ 10%]\n[gw0] [ 20%] FAILED tests/a.py::t2\ncollecting ...\n")
    result = gpu_check._test_result("timeout", str(junit), str(log))
    assert result["status"] == "timeout" and result["counts"]["passed"] == 1 and result["counts"]["failed"] == 1
    assert gpu_check._test_result(5, str(tmp_path / "none.xml"), str(log))["status"] == "no cuda tests"


def test_gpu_check_rerun_keeps_earlier_rows():
    row = lambda name, skipped=False: ({"name": name, "skipped": "budget"} if skipped  # noqa: E731
                                       else {"name": name, "providers": {"eager": {"median_s": 1.0}}})
    earlier = {"results": [row("a"), row("b", skipped=True)], "dropped": [{"case": "a"}]}
    later = {"results": [row("b")], "dropped": []}
    assert gpu_check._measured_cases(earlier) == ["a"]
    merged = gpu_check._merge_reports(earlier, later)
    assert [r["name"] for r in merged["results"]] == ["a", "b"] and "skipped" not in merged["results"][1]
    assert gpu_check._merge_reports(earlier, None) is earlier
    assert gpu_check._bench_status("timeout", None) == "timeout (no row finished)"
    assert gpu_check._bench_status(0, {"results": [row("a", skipped=True)]}) == "partial (budget spent)"
    assert gpu_check._bench_status(1, later).startswith("crashed")


def test_gpu_check_summary_lists_speedups():
    state = {"mode": "full", "date": "d", "elapsed_s": 1, "total_limit_s": 360,
             "machine": {"gpu": "NVIDIA H200", "cpus": 16, "python": "3.12"}, "build": {"status": "ok"},
             "tests": {"tests/test_nms.py": {"status": "passed", "counts": {"passed": 3}}},
             "benchmarks": {"detection": {"status": "complete", "report": {"results": [
                 {"name": "nms", "baseline": "torchvision",
                  "providers": {"torchvision": {"median_s": 4e-3}, "torch.compile": {"median_s": 2e-3},
                                "fastbb": {"median_s": 1e-3}}}]}}}}
    text = gpu_check.summary(state)
    assert "NVIDIA H200" in text and "passed 3" in text
    assert "4.00x" in text and "2.00x" in text


def test_busy_processes_run_beside_the_block_and_stop(monkeypatch):
    import subprocess

    started = []
    real_popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(real_popen(*a, **k)) or started[-1])
    with runner.busy_processes(2):
        assert len(started) == 2 and all(p.poll() is None for p in started)  # running
    assert all(p.poll() is not None for p in started)  # stopped


def test_compare_runs_takes_medians_over_runs(tmp_path, capsys):
    """Per row and provider, the median over a side's runs; new/old and busy/quiet from those medians."""
    def write(path, eager_s, fastbb_s):
        row = {"name": "row", "baseline": "eager",
               "providers": {"eager": {"median_s": eager_s}, "fastbb": {"median_s": fastbb_s}}}
        path.write_text(json.dumps({"results": [row]}))

    for i, fastbb_s in enumerate([1.0, 3.0, 2.0]):
        write(tmp_path / f"old-{i}.json", 4.0, fastbb_s)
    for i, fastbb_s in enumerate([2.2, 9.0, 1.0]):
        write(tmp_path / f"new-{i}.json", 8.0, fastbb_s)
    compare_runs.compare_times(str(tmp_path / "old-*.json"), str(tmp_path / "new-*.json"))
    out = capsys.readouterr().out
    assert "new/old  1.10" in out and "slowest new/old: 1.100 (row, fastbb)" in out
    compare_runs.compare_speedups(str(tmp_path / "old-*.json"), str(tmp_path / "new-*.json"))
    # quiet speedups 4, 1.33, 2 -> median 2; busy 3.64, 0.89, 8 -> median 3.64
    assert "quiet   2.00x (1.33-4.00)  busy   3.64x (0.89-8.00)  busy/quiet 1.82" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no file matches"):
        compare_runs.load(str(tmp_path / "missing-*.json"))
