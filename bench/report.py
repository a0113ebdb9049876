#!/usr/bin/env python3
"""Turn bench/results.json (from bench/run.py) into markdown for the README's performance section.

python bench/report.py [--in bench/results.json] [--out bench/results.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from csi.steps import DIRECTORY_STEPS, PUBLISH_STEPS, RESERVE, TEARDOWN_STEPS

REPO = Path(__file__).resolve().parents[1]

FLOW_TITLES = {
    "ours": "**luks-ephemeral-csi** (driver via its socket)",
    "handrun": "hand-run minimal LUKS (the driver's own commands)",
    "floor": "floor: no encryption (loop + lazy mkfs + mount)",
    "conventional": "conventional LUKS driver (ceph-csi style)",
}
GOAL_TITLES = {
    "publish_vs_handrun_p50": "publish p50, ours / hand-run",
    "conventional_vs_ours_p50": "publish p50, conventional / ours",
    "concurrency_speedup_16": "16 publishes: sequential / concurrent wall, mean (0 errors)",
    "alloc_10g_mib": "allocated on disk right after publishing 10 GiB (loop)",
    "rss_50_volumes_mib": "driver RSS with 50 volumes published",
    "integrity_2g_vs_256m": "integrity (hmac-sha256) publish p50, 2 GiB / 256 MiB",
    "fscrypt_publish_vs_bind_p50": "fscrypt publish p50 / mkdir + bind + remount",
    "luks_vs_fscrypt_publish_p50": "loop-LUKS publish p50 / fscrypt publish p50",
    "shred_50_vs_unpublish_1": "shred of 50 live volumes (p50) / unpublish of one (p50)",
}
FSCRYPT_TITLES = {
    "fscrypt": "**backing=fscrypt** (driver via its socket)",
    "bind_floor": "floor: mkdir + bind + remount nosuid,nodev (no key, no quota)",
    "bind_floor_syscalls": "the same floor with mount(2)/umount2(2), as the driver now binds",
    "luks": "backing=loop, LUKS2 (driver via its socket)",
}
# the fscrypt phase's step table: fscrypt's own steps first, then the LUKS ones, then teardown
FSCRYPT_STEPS = tuple(dict.fromkeys((RESERVE, *DIRECTORY_STEPS, *PUBLISH_STEPS, *TEARDOWN_STEPS)))
INTEGRITY_TITLES = {
    "integrity_small": "integrity=hmac-sha256",
    "integrity_large": "integrity=hmac-sha256",
    "plain_small": "no integrity (reference)",
}
INTEGRITY_STEPS = ("format", "open", "mkfs", "mount")
UNPUBLISH_STEPS = TEARDOWN_STEPS


def fmt(value: Any, digits: int = 2, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return f"{value:.{digits}f}{unit}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def met(value: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[value]


def render(results: dict[str, Any]) -> str:
    s = results["summary"]
    env = results["environment"]
    cfg = results["config"]
    out = [
        "## Performance",
        "",
        f"Measured by `make bench` on {s['date']}, kernel {s['kernel']}, "
        f"{env['cpus']} vCPUs, {env['tools']['cryptsetup'].split(' flags')[0]}, "
        f"{env['tools']['mke2fs'].split(' (')[0]}.",
        "",
    ]
    if s["emulated"]:
        out += [
            "> Run under software emulation (QEMU TCG, no KVM): every absolute time is 10-50x "
            "that of real hardware. Only the ratios, taken inside this one run, mean anything.",
            "",
        ]
    if results.get("error"):
        out += [f"> The run failed part-way: `{results['error']}`; missing numbers show n/a.", ""]

    out += ["### Goals", ""]
    rows = []
    for key, g in s.get("goals", {}).items():
        unit = " MiB" if key.endswith("_mib") else "x"
        rows.append(
            [GOAL_TITLES.get(key, key), g["target"], fmt(g["value"], 2, unit), met(g["met"])]
        )
    out += table(["goal", "target", "measured", "result"], rows)

    lat = results.get("latency", {}).get("flows", {})
    if lat:
        ours = lat.get("ours", {}).get("stats", {})
        out += [
            f"### Publish and unpublish latency ({cfg['size']} volumes, "
            f"{cfg['cycles']} cycles per flow, interleaved)",
            "",
        ]
        rows = []
        for name in ("ours", "handrun", "floor", "conventional"):
            st = lat.get(name, {}).get("stats")
            if not st:
                continue
            rel = ours.get("publish_p50_s")
            rows.append(
                [
                    FLOW_TITLES[name],
                    fmt(st["publish_p50_s"]),
                    fmt(st["publish_p95_s"]),
                    fmt(st["unpublish_p50_s"]),
                    fmt(st["unpublish_p95_s"]),
                    fmt(st["cycle_p50_s"]),
                    fmt(st["publish_p50_s"] / rel if rel and st["publish_p50_s"] else None, 2, "x"),
                    fmt(st.get("alloc_p50_mib"), 1),
                    str(len(lat[name].get("errors", []))),
                ]
            )
        out += table(
            [
                "flow",
                "publish p50 s",
                "publish p95 s",
                "unpublish p50 s",
                "unpublish p95 s",
                "cycle p50 s",
                "publish vs ours",
                "allocated MiB",
                "errors",
            ],
            rows,
        )
        out += [
            f"Ratios: ours / hand-run **{fmt(s['publish_vs_handrun_p50'], 2, 'x')}**, "
            f"conventional / ours **{fmt(s['conventional_vs_ours_p50'], 2, 'x')}**, "
            f"ours / floor **{fmt(s['publish_vs_floor_p50'], 2, 'x')}** (publish p50); "
            f"for the whole publish+unpublish cycle: {fmt(s.get('cycle_vs_handrun_p50'), 2, 'x')}, "
            f"{fmt(s.get('cycle_conventional_vs_ours_p50'), 2, 'x')}, "
            f"{fmt(s.get('cycle_vs_floor_p50'), 2, 'x')}.",
            "",
        ]
        out += steps_table(lat)
        out += flow_notes(results)

    conc = results.get("concurrency")
    if conc:
        seq, par = conc["sequential"], conc["concurrent"]
        repeats = conc.get("repeats", 1)
        out += [
            f"### Concurrency ({conc['volumes']} publishes of {conc['size']}, "
            f"each mode run {repeats}x in ABBA order, mean wall shown)",
            "",
        ]
        out += table(
            ["", "publish wall s", "unpublish wall s", "errors"],
            [
                [
                    "in sequence",
                    fmt(seq["publish_wall_s"]),
                    fmt(seq["unpublish_wall_s"]),
                    str(len(seq["errors"])),
                ],
                [
                    "all at once (threads)",
                    fmt(par["publish_wall_s"]),
                    fmt(par["unpublish_wall_s"]),
                    str(len(par["errors"])),
                ],
                [
                    "speed-up",
                    fmt(conc["speedup"], 2, "x")
                    + (
                        " (per pair: "
                        + ", ".join(fmt(x, 2, "x") for x in conc["speedup_per_repeat"])
                        + ")"
                        if conc.get("speedup_per_repeat")
                        else ""
                    ),
                    fmt(conc.get("unpublish_speedup"), 2, "x"),
                    "",
                ],
            ],
        )

    foot = results.get("footprint")
    if foot:
        out += ["### Disk footprint", ""]
        out += table(
            [
                "backing",
                "volume",
                "allocated right after publish",
                "after sync",
                "header",
                "publish s (1 sample)",
                "unpublish s (1 sample)",
            ],
            [footprint_row("loop (sparse file)", foot), qcow2_row(foot)],
        )
        q = foot.get("qcow2")
        if q:
            out += [
                f"qcow2 / loop, this one volume each: publish "
                f"**{fmt(s.get('qcow2_publish_vs_loop'), 2, 'x')}**, unpublish "
                f"**{fmt(s.get('qcow2_unpublish_vs_loop'), 2, 'x')}** (one sample each, loop "
                "first). Left behind after the qcow2 unpublish (NBD device, image, header, "
                "mapping, qemu-storage-daemon export and node): "
                + (f"**{', '.join(q['leftovers'])}**" if q.get("leftovers") else "nothing")
                + ".",
                "",
            ]

    out += integrity_section(results)
    out += fscrypt_section(results)
    out += shred_section(results)

    mem = results.get("memory")
    if mem or results.get("rss_idle_mib") is not None:
        out += ["### Driver memory (VmRSS)", ""]
        rows = [["idle, just started", fmt(s.get("rss_idle_mib"), 1, " MiB")]]
        if mem:
            rows.append(
                [
                    f"{mem['volumes_published']} volumes of {mem['volume_size']} published",
                    fmt(mem["rss_with_volumes_mib"], 1, " MiB"),
                ]
            )
            rows.append(
                [
                    "after unpublishing them",
                    fmt(mem["after_unpublish"].get("VmRSS", 0) / 2**20, 1, " MiB"),
                ]
            )
        out += table(["state", "RSS"], rows)
        if mem:
            out += [f"{mem['note']}.", ""]

    dp = results.get("datapath")
    if dp:
        out += ["### Data path", ""]
        out += table(
            ["", "value"],
            [
                ["dm table (key redacted)", f"`{dp['dm_table']}`"],
                ["key", "kernel keyring reference" if dp["key_in_kernel_keyring"] else "inline"],
                ["no_read_workqueue / no_write_workqueue",
                 f"{fmt(dp['perf_no_read_workqueue'])} / {fmt(dp['perf_no_write_workqueue'])}"],
                ["crypt sector size", str(dp["crypt_sector_size"])],
                ["dm logical block size", str(dp["dm_logical_block_size"])],
                ["loop direct I/O (`/sys/block/loopN/loop/dio`)", fmt(dp["loop_direct_io"])],
                ["loop logical block size", str(dp["loop_logical_block_size"])],
                ["keyslot KDF", kdf_text(dp.get("keyslot_kdf"))],
            ],
        )  # fmt: skip
        conv = (results.get("datapath_baselines") or {}).get("conventional")
        if conv:
            out += [
                f"Conventional flow, for comparison: `{conv['dm_table']}`, keyslot KDF "
                f"{kdf_text(conv.get('keyslot_kdf'))}.",
                "",
            ]

    notes = results.get("notes", [])
    if notes:
        out += ["### Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out).rstrip() + "\n"


def measured_alone(results: dict[str, Any], section: dict[str, Any], phase: str) -> list[str]:
    """A line saying when ``phase`` was measured, if that was a run of its own (``--only``)."""
    measured = section.get("measured", {})
    when = measured.get("date")
    if not when or when == results["summary"].get("date"):
        return []
    return [
        f"Measured on its own by `bench/run.py --only {phase}` on {when}, kernel "
        f"{measured.get('kernel')}"
        + (", under software emulation" if measured.get("emulated") else "")
        + ".",
        "",
    ]


def integrity_section(results: dict[str, Any]) -> list[str]:
    integ = results.get("integrity")
    if not integ:
        return []
    s = results["summary"]
    out = [
        f"### Integrity: publish cost against size ({integ.get('fs_type', 'ext4')}, "
        f"{integ.get('cycles')} cycles per flow, interleaved)",
        "",
    ]
    out += measured_alone(results, integ, "integrity")
    rows = []
    for name, flow in integ.get("flows", {}).items():
        st = flow.get("stats", {})
        steps = flow.get("step_means_s", {})
        rows.append(
            [
                INTEGRITY_TITLES.get(name, name),
                str(flow.get("size")),
                fmt(st.get("publish_p50_s")),
                fmt(st.get("publish_p95_s")),
                fmt(st.get("unpublish_p50_s")),
                *[fmt(steps.get(step), 3) for step in INTEGRITY_STEPS],
                fmt(st.get("alloc_p50_mib"), 1),
                str(len(flow.get("errors", []))),
            ]
        )
    out += table(
        [
            "volume",
            "size",
            "publish p50 s",
            "publish p95 s",
            "unpublish p50 s",
            *[f"{step} s" for step in INTEGRITY_STEPS],
            "allocated MiB",
            "errors",
        ],
        rows,
    )
    out += [
        f"Integrity publish p50, 2 GiB / 256 MiB: **{fmt(s.get('integrity_2g_vs_256m'), 2, 'x')}** "
        f"(goal <= 2x; the wipe alone would grow 8x); integrity / no integrity at 256 MiB: "
        f"{fmt(s.get('integrity_256m_vs_plain_256m'), 2, 'x')}. Step times are means of "
        "each publish's own `luks_ephemeral_step_seconds`.",
        "",
    ]
    return out


def fscrypt_section(results: dict[str, Any]) -> list[str]:
    fs = results.get("fscrypt")
    if not fs:
        return []
    s = results["summary"]
    out = [
        f"### fscrypt: publish against a bare bind and against LUKS ({fs.get('size')} volumes, "
        f"{fs.get('cycles')} cycles per flow, interleaved)",
        "",
    ]
    if fs.get("unavailable"):
        return [*out, f"Not measured: the driver refused the volume ({fs['unavailable']}).", ""]
    rows = []
    for name, flow in fs.get("flows", {}).items():
        st = flow.get("stats", {})
        rows.append(
            [
                FSCRYPT_TITLES.get(name, name),
                fmt(st.get("publish_p50_s"), 3),
                fmt(st.get("publish_p95_s"), 3),
                fmt(st.get("unpublish_p50_s"), 3),
                fmt(st.get("unpublish_p95_s"), 3),
                str(len(flow.get("errors", []))),
            ]
        )
    out += table(
        ["flow", "publish p50 s", "publish p95 s", "unpublish p50 s", "unpublish p95 s",
         "errors"],
        rows,
    )  # fmt: skip
    out += [
        f"fscrypt / floor, publish p50: **{fmt(s.get('fscrypt_publish_vs_bind_p50'), 2, 'x')}** "
        f"(goal <= 1.5x); loop-LUKS / fscrypt: "
        f"**{fmt(s.get('luks_vs_fscrypt_publish_p50'), 2, 'x')}** (goal >= 20x); unpublish: "
        f"fscrypt / floor {fmt(fs.get('fscrypt_vs_bind_unpublish_p50'), 2, 'x')}, loop-LUKS / "
        f"fscrypt {fmt(fs.get('luks_vs_fscrypt_unpublish_p50'), 2, 'x')}. Not a goal: fscrypt "
        f"against the floor done with the driver's own syscalls (no mount process): "
        f"{fmt(fs.get('fscrypt_vs_bind_syscalls_p50'), 2, 'x')}.",
        "",
    ]
    flows = fs.get("flows", {})
    means = {n: flows.get(n, {}).get("step_means_s", {}) for n in ("fscrypt", "luks")}
    steps = [step for step in FSCRYPT_STEPS
             if any(step in m for m in means.values())]  # fmt: skip
    if steps:
        rows = [
            [f"{'unpublish' if step in TEARDOWN_STEPS else 'publish'}: {step}",
             *[fmt(means[n].get(step), 4) for n in means]]
            for step in steps
        ]  # fmt: skip
        out += [
            "Mean seconds per step (each cycle's own `luks_ephemeral_step_seconds`):",
            "",
            *table(["step", "fscrypt", "luks"], rows),
        ]
    pool = fs.get("pool") or {}
    if pool.get("own_pool"):
        apparent = (pool.get("pool_apparent_bytes") or 0) / 2**30
        allocated = (pool.get("pool_allocated_bytes") or 0) / 2**20
        out += [
            f"The volumes lived in the driver's own pool ({fmt(apparent, 1)} "
            f"GiB sparse ext4 image, {fmt(allocated, 1)} MiB "
            "allocated), made by the first fscrypt publish, which ran before the recorded rounds.",
            "",
        ]
    return out


def shred_section(results: dict[str, Any]) -> list[str]:
    sh = results.get("shred")
    if not sh:
        return []
    s = results["summary"]
    out = [
        f"### Emergency shred: {sh.get('volumes')} live volumes against the unpublish of one "
        f"({sh.get('size')} loop volumes, {sh.get('cycles')} cycles)",
        "",
    ]
    out += measured_alone(results, sh, "shred")
    rows = []
    for run in sh.get("runs", []):
        w = run.get("writer", {})
        outcomes = run.get("outcomes", {})
        rows.append(
            [
                str(run.get("cycle")),
                fmt(run.get("publish_wall_s"), 1),
                fmt(run.get("seconds"), 3),
                fmt(run.get("call_wall_s"), 3),
                f"{outcomes.get('wiped', 0)} / {run.get('volumes')}",
                f"{w.get('files_failed')} / {run.get('volumes')}",
                fmt(run.get("unpublish_wall_s"), 1),
                fmt(run.get("unpublish_p50_s"), 2),
            ]
        )
    out += table(
        ["cycle", f"publish {sh.get('volumes')} wall s", "shred s (driver)", "shred call wall s",
         "wiped", "writer files failed", f"unpublish {sh.get('volumes')} wall s",
         "unpublish p50 s (shredded)"],
        rows,
    )  # fmt: skip
    one = sh.get("unpublish_1", {})
    st = one.get("stats", {})
    out += [
        f"Shred of {sh.get('volumes')} live volumes / unpublish of one, p50: "
        f"**{fmt(s.get('shred_50_vs_unpublish_1'), 2, 'x')}** (goal <= 2x): shred "
        f"{fmt(sh.get('shred_p50_s'), 3)} s (the report's own seconds, trigger to last key gone; "
        f"per cycle: {', '.join(fmt(x, 3) for x in sh.get('shred_seconds', []))}), unpublish "
        f"of one {fmt(st.get('unpublish_p50_s'), 3)} s (p50 of {st.get('n')}, p95 "
        f"{fmt(st.get('unpublish_p95_s'), 3)} s, {len(one.get('errors', []))} errors). "
        f"With the wall time of the admin call instead: "
        f"{fmt(s.get('shred_50_wall_vs_unpublish_1'), 2, 'x')} "
        f"({fmt(sh.get('shred_call_wall_p50_s'), 3)} s).",
        "",
        f"Live: {sh.get('live')}. Every shred was checked complete (every volume `wiped`, the "
        "node sealed, no crypt table left on any mapping of ours); every shredded volume was "
        "then unpublished and the node unsealed.",
        "",
    ]
    return out


def footprint_row(title: str, f: dict[str, Any]) -> list[str]:
    header = f.get("detached_header_bytes_on_tmpfs")
    return [
        title,
        f["size"],
        fmt(f["allocated_bytes_right_after_publish"] / 2**20, 2, " MiB"),
        fmt(f["allocated_bytes_after_sync"] / 2**20, 2, " MiB"),
        "n/a" if header is None else f"{header} bytes, detached on tmpfs",
        fmt(f.get("publish_s")),
        fmt(f.get("unpublish_s")),
    ]


def qcow2_row(foot: dict[str, Any]) -> list[str]:
    q = foot.get("qcow2")
    if q:
        return footprint_row("qcow2 (image over NBD)", q)
    why = foot.get("qcow2_note") or "not measured"
    return ["qcow2", foot["size"], "n/a", "n/a", why, "n/a", "n/a"]


def kdf_text(kdf: dict[str, str] | None) -> str:
    if not kdf:
        return "n/a"
    return ", ".join(f"{k.lower()} {v}" for k, v in kdf.items())


def steps_table(lat: dict[str, Any]) -> list[str]:
    names = ("ours", "handrun", "floor", "conventional")
    means = {n: lat.get(n, {}).get("step_means_s", {}) for n in names}
    present = [n for n in names if n in lat]
    rows = []
    for step in (*PUBLISH_STEPS, *UNPUBLISH_STEPS):
        if not any(step in means[n] for n in present):
            continue
        phase = "publish" if step in PUBLISH_STEPS else "unpublish"
        rows.append([f"{phase}: {step}", *[fmt(means[n].get(step), 3) for n in present]])
    if not rows:
        return []
    return [
        "Mean time per lifecycle step, seconds (ours from the driver's "
        "`luks_ephemeral_step_seconds`; baselines timed per command):",
        "",
        *table(["step", *present], rows),
    ]


def flow_notes(results: dict[str, Any]) -> list[str]:
    lines = []
    script = results.get("handrun_script", {})
    if script:
        same = script.get("matches_template")
        lines.append(
            f"- hand-run: {script.get('source', '?')}"
            + ("" if same is None else f" (same as bench's built-in copy: {fmt(same)})")
            + "; the sparse file is made in-process, the key is 64 bytes of os.urandom on stdin."
        )
    lines.append(
        "- conventional: `cryptsetup -q luksFormat --type luks2 --hash sha256 --pbkdf argon2id "
        "--pbkdf-memory 32768` (default 2 s iteration time), `luksOpen --disable-keyring`, "
        "header on the device, no perf flags, `mkfs.ext4 -F -q`, plain `mount`."
    )
    mkfs = results.get("mkfs_default")
    if mkfs:
        lines.append(
            f'- "default" mkfs.ext4 here means lazy_itable_init={mkfs["lazy_itable_init"]} '
            f"({mkfs['lazy_itable_init_source']}), lazy_journal_init="
            f"{mkfs['lazy_journal_init']} ({mkfs['lazy_journal_init_source']}); discard "
            f"{mkfs['discard']}; {mkfs['mount']}."
        )
    lines.append(
        "- floor: the same loop flags, `mkfs.ext4 -F -q -m 0 -E "
        "lazy_itable_init=1,lazy_journal_init=1,nodiscard`, `mount -o "
        "rw,nosuid,nodev,noinit_itable`."
    )
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/report.py", description=__doc__)
    parser.add_argument("--in", dest="src", type=Path, default=REPO / "bench" / "results.json")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results.md")
    args = parser.parse_args(argv)
    try:
        results = json.loads(args.src.read_text())
    except (OSError, ValueError) as exc:
        print(f"bench/report.py: cannot read {args.src}: {exc}", file=sys.stderr)
        return 1
    args.out.write_text(render(results))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
