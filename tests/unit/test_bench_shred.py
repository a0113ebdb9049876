"""The bench's shred phase: what makes a measured shred no figure, the rotation of its rounds,
the ratio and goal in the summary, the report's section, --only's merge, the writer."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench import shred as bench_shred
from bench.cli import parse_args
from bench.common import BenchError
from bench.flows import Sample
from bench.report import render
from bench.shred import WRITER, count_targets, parse_tables, shred_phase, shred_problems
from bench.summary import GOAL_SHRED_MAX, merged, notes, summarise
from csi import admin

IDS = ["csi-a", "csi-b"]
MAPPINGS = ["luks-eph-a", "luks-eph-b"]


def answer(*outcomes: str, complete: bool = True, sealed: bool = True) -> dict[str, Any]:
    volumes = [{"volume_id": v, "backing": "loop", "outcome": o, "detail": "d"}
               for v, o in zip(IDS, outcomes, strict=True)]  # fmt: skip
    return {"report": {"seconds": 0.5, "complete": complete, "sealed": sealed,
                       "summary": "s", "volumes": volumes}}  # fmt: skip


WIPED_TABLES = {m: ["error"] for m in MAPPINGS}


def test_a_complete_shred_of_every_volume_is_a_figure() -> None:
    assert shred_problems(answer("wiped", "wiped"), IDS, MAPPINGS, WIPED_TABLES) == []


@pytest.mark.parametrize(
    ("ans", "tables", "expected"),
    [
        ({"error": "INTERNAL", "message": "boom"}, WIPED_TABLES, "answered INTERNAL: boom"),
        ({"unsealed": True}, WIPED_TABLES, "no report"),
        (answer("wiped", "wiped", complete=False), WIPED_TABLES, "not complete"),
        (answer("wiped", "wiped", sealed=False), WIPED_TABLES, "not sealed"),
        (answer("wiped", "failed", complete=False), WIPED_TABLES, "csi-b: failed (d)"),
        # no_key is complete to the driver, but a live volume of ours had a key to wipe
        (answer("wiped", "no_key"), WIPED_TABLES, "csi-b: no_key"),
        (answer("wiped", "wiped"), {**WIPED_TABLES, "luks-eph-b": ["crypt"]},
         "luks-eph-b still has a crypt table"),
    ],
)  # fmt: skip
def test_a_failed_or_partial_shred_is_not(
    ans: dict[str, Any], tables: dict[str, list[str]], expected: str
) -> None:
    problems = shred_problems(ans, IDS, MAPPINGS, tables)
    assert any(expected in p for p in problems), problems


def test_a_volume_missing_from_the_report_is_a_problem() -> None:
    ans = answer("wiped", "wiped")
    ans["report"]["volumes"].pop()
    assert shred_problems(ans, IDS, MAPPINGS, WIPED_TABLES) == ["csi-b: not in the report"]


def test_count_targets() -> None:
    tables = {"luks-eph-a": ["error"], "other": ["crypt"]}
    assert count_targets(MAPPINGS, tables) == {"error": 1, "gone": 1}


class FakeDriver:
    state_dir = Path("/nonexistent")


def test_the_phase_rotates_its_blocks_and_takes_p50s(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(admin, "call", lambda *a, **k: {"sealed": False})
    shreds = iter([(2.0, 2.5), (1.0, 1.2), (3.0, 3.1)])

    def cycle(driver: object, n: int, size: str, index: int) -> dict[str, Any]:
        calls.append("shred")
        seconds, wall = next(shreds)
        return {"cycle": index, "seconds": seconds, "call_wall_s": wall}

    unpublishes = iter([0.5, 0.9, 1.1, 1.0, 0.7, 0.8, 2.0])  # the first one is the warm-up

    def one(self: object, i: int) -> Sample:
        calls.append("one")
        return Sample(publish=1.0, unpublish=next(unpublishes), alloc_bytes=0)

    monkeypatch.setattr(bench_shred, "shred_cycle", cycle)
    monkeypatch.setattr(bench_shred.UnpublishOne, "cycle", one)
    result = shred_phase(FakeDriver(), 50, "64Mi", 3, 2, 1)  # type: ignore[arg-type]
    assert calls == ["one", "one", "one", "shred", "shred", "one", "one", "one", "one", "shred"]
    assert result["order"] == ["unpublish_1", "shred", "shred", "unpublish_1", "unpublish_1",
                               "shred"]  # fmt: skip
    assert result["shred_seconds"] == [2.0, 1.0, 3.0]
    assert result["shred_p50_s"] == 2.0 and result["shred_call_wall_p50_s"] == 2.5
    # unpublish_1 p50 of 0.9, 1.1, 1.0, 0.7, 0.8, 2.0 (warm-up left out) = 0.95
    assert result["unpublish_1"]["stats"]["unpublish_p50_s"] == 0.95
    assert result["shred_vs_unpublish_1_p50"] == round(2.0 / 0.95, 3)
    assert result["shred_wall_vs_unpublish_1_p50"] == round(2.5 / 0.95, 3)
    assert result["errors"] == 0


def test_a_sealed_node_is_refused_before_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin, "call", lambda *a, **k: {"sealed": True, "seal": "x"})
    with pytest.raises(BenchError, match="sealed before"):
        shred_phase(FakeDriver(), 50, "64Mi", 1, 1, 0)  # type: ignore[arg-type]


def results_with(shred: dict[str, Any] | None) -> dict[str, Any]:
    results: dict[str, Any] = {
        "date": "2026-12-02T08:00:00Z",
        "environment": {"kernel": "6.1.0-57-amd64", "emulated": True, "cpus": 2,
                        "tools": {"cryptsetup": "cryptsetup 2.6.1 flags: x",
                                  "mke2fs": "mke2fs 1.47.0 (5-Feb-2023)"}},
        "config": {"phases": ["shred"]},
    }  # fmt: skip
    if shred is not None:
        results["shred"] = shred
    return results


SHRED = {
    "volumes": 50,
    "size": "64Mi",
    "cycles": 3,
    "baseline_per_round": 2,
    "live": "one writer process",
    "shred_seconds": [0.8, 0.9, 1.0],
    "shred_call_walls_s": [0.85, 0.95, 1.05],
    "shred_p50_s": 0.9,
    "shred_call_wall_p50_s": 0.95,
    "unpublish_1": {"stats": {"n": 6, "unpublish_p50_s": 1.2, "unpublish_p95_s": 1.4},
                    "errors": []},
    "runs": [{"cycle": 0, "volumes": 50, "seconds": 0.8, "call_wall_s": 0.85,
              "publish_wall_s": 60.0, "outcomes": {"wiped": 50},
              "writer": {"files_failed": 50}, "unpublish_wall_s": 30.0,
              "unpublish_p50_s": 4.0}],
    "shred_vs_unpublish_1_p50": 0.75,
    "shred_wall_vs_unpublish_1_p50": 0.792,
    "errors": 0,
    "measured": {"date": "2026-12-02T08:00:00Z", "kernel": "6.1.0-57-amd64", "emulated": True},
}  # fmt: skip


def test_the_summary_has_the_ratio_and_its_goal() -> None:
    s = summarise(results_with(SHRED))
    assert s["shred_50_vs_unpublish_1"] == 0.75
    assert s["shred_50_wall_vs_unpublish_1"] == 0.792
    assert s["shred_p50_s"] == 0.9 and s["unpublish_1_p50_s"] == 1.2
    assert s["shred_seconds"] == [0.8, 0.9, 1.0] and s["shred_volumes"] == 50
    assert s["goals"]["shred_50_vs_unpublish_1"] == {
        "target": f"<= {GOAL_SHRED_MAX:g}x", "value": 0.75, "met": True}  # fmt: skip


def test_the_goal_is_missed_above_2x_or_with_errors() -> None:
    slow = summarise(results_with({**SHRED, "shred_vs_unpublish_1_p50": 2.5}))
    assert slow["goals"]["shred_50_vs_unpublish_1"]["met"] is False
    broken = summarise(results_with({**SHRED, "errors": 1}))
    assert broken["goals"]["shred_50_vs_unpublish_1"]["met"] is False


def test_without_the_phase_the_goal_is_not_measured() -> None:
    s = summarise(results_with(None))
    assert s["shred_50_vs_unpublish_1"] is None
    assert s["goals"]["shred_50_vs_unpublish_1"]["met"] is None


def test_the_report_renders_the_goal_and_the_section() -> None:
    results = results_with(SHRED)
    results["summary"] = summarise(results)
    results["notes"] = notes(results)
    text = render(results)
    assert "| shred of 50 live volumes (p50) / unpublish of one (p50) | <= 2x | 0.75x | met |" in (
        text)  # fmt: skip
    assert "### Emergency shred: 50 live volumes against the unpublish of one" in text
    assert "**0.75x** (goal <= 2x)" in text
    assert "| 0 | 60.0 | 0.800 | 0.850 | 50 / 50 | 50 / 50 | 30.0 | 4.00 |" in text
    assert any(n.startswith("Shred: 3 cycles") for n in results["notes"])


def test_only_shred_is_a_phase_and_merges_its_config(tmp_path: Path) -> None:
    args = parse_args(["--only", "shred", "--shred-cycles", "2"])
    assert args.phases == ["shred"] and args.merge and args.shred_cycles == 2
    old = results_with(None)
    old["config"] = {"phases": ["latency"], "shred_cycles": 9}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(old))
    fresh = results_with(SHRED)
    fresh["config"] = {"shred_volumes": 50, "shred_size": "64Mi", "shred_cycles": 2,
                       "shred_baseline": 2}  # fmt: skip
    out = merged(path, fresh, ["shred"])
    assert out["shred"] == SHRED
    assert out["config"]["phases"] == ["latency", "shred"]
    assert out["config"]["shred_cycles"] == 2


def test_the_writer_writes_to_every_file_and_reports_on_sigterm(tmp_path: Path) -> None:
    paths = [str(tmp_path / f"f{i}") for i in range(3)]
    proc = subprocess.Popen([sys.executable, "-c", WRITER, "0.01", "512", *paths],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    summary = json.loads(out.strip().splitlines()[-1])
    assert proc.returncode == 0 and summary["errnos"] == [None, None, None]
    assert all(w >= 1 for w in summary["writes"]) and summary["passes"] >= 1
    assert all(Path(p).stat().st_size == 512 * w for p, w in zip(paths, summary["writes"],
                                                                  strict=True))  # fmt: skip


def test_errno_counts_name_each_errno() -> None:
    assert bench_shred.errno_counts([5, None, 30, 5]) == {"EIO": 2, "EROFS": 1}


def test_log_lines_keep_what_was_logged_from_the_offset(tmp_path: Path) -> None:
    class Logged:
        log_path = tmp_path / "driver.log"

    Logged.log_path.write_text("before\n")
    offset = Logged.log_path.stat().st_size
    with Logged.log_path.open("a") as f:
        f.write("one\n" + "x" * 500 + "\n" + "".join(f"l{i}\n" for i in range(10)))
    lines = bench_shred.log_lines(Logged(), offset, limit=4)  # type: ignore[arg-type]
    assert lines == ["one", "x" * 400 + " ...", "...", "l8", "l9"]
    assert bench_shred.log_lines(Logged(), offset)[:1] == ["one"]  # type: ignore[arg-type]


def test_parse_tables_reads_every_devices_target_types() -> None:
    out = ("luks-eph-aaa: 0 131072 crypt aes-xts-plain64 :64:logon:cryptsetup:x 0 7:1 32768\n"
           "luks-eph-bbb: 0 131072 error \nluks-eph-ccc: 0 8 linear 7:2 0\n"
           "luks-eph-ccc: 8 8 error\nNo devices found\n")  # fmt: skip
    assert parse_tables(out) == {"luks-eph-aaa": ["crypt"], "luks-eph-bbb": ["error"],
                                 "luks-eph-ccc": ["linear", "error"]}  # fmt: skip
