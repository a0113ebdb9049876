"""Operator commands on the node: ``luks-ephemeral-csi shred --all|--volume ID`` and ``unseal``.

They go to the running driver through its admin socket; with no driver running they act
themselves, under the state-dir lock (so a driver starting meanwhile waits for them). Each
prints, per volume, what was wiped and what could not be, and why.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from csi import admin
from csi.admin import AdminUnavailable, Handler
from csi.config import Config
from csi.errors import InvalidArgument
from csi.host import NodeHost
from csi.ids import check_volume_id
from csi.shred import Shredder
from csi.statelock import LockHeld, state_dir_lock
from csi.volumes import Volumes

log = logging.getLogger(__name__)

EXIT_INCOMPLETE = 1  # a key could not be wiped, or the command failed
EXIT_NO_DRIVER = 4  # the state dir is locked by a driver that does not answer


def handlers(shredder: Shredder) -> dict[str, Handler]:
    def shred(request: dict[str, Any]) -> dict[str, Any]:
        volume = request.get("volume")
        if volume is None:
            report = shredder.shred_all(trigger="cli")
        elif isinstance(volume, str):
            check_volume_id(volume)
            report = shredder.shred_volume(volume)
        else:
            raise InvalidArgument("volume must be a volume id string")
        return {"report": report.to_json()}

    def unseal(request: dict[str, Any]) -> dict[str, Any]:
        del request
        return {"unsealed": shredder.unseal(trigger="cli")}

    def status(request: dict[str, Any]) -> dict[str, Any]:
        del request
        state = shredder.seal.state()
        return {"sealed": state is not None, "seal": state.describe() if state else ""}

    return {"shred": shred, "unseal": unseal, "status": status}


def send(config: Config, request: dict[str, Any], host: NodeHost) -> dict[str, Any]:
    """To the running driver, or, with none running, done here under the state-dir lock."""
    try:
        return admin.call(config.state_dir, request)
    except AdminUnavailable as unreachable:
        try:
            with state_dir_lock(config.state_dir).acquire(0.0):
                log.info("no driver runs on %s: acting alone", config.state_dir)
                shredder = Shredder(Volumes(config, host))
                return admin.dispatch(handlers(shredder), request)
        except LockHeld as held:
            return {"error": "UNAVAILABLE", "exit": EXIT_NO_DRIVER,
                    "message": f"{unreachable}, and {held}: is the driver hung?"}


def run(config: Config, request: dict[str, Any], host: NodeHost, as_json: bool) -> int:
    answer = send(config, request, host)
    if as_json:
        print(json.dumps(answer, indent=2))
    if "error" in answer:
        if not as_json:
            print(f"error ({answer['error']}): {answer.get('message', '')}")
        return int(answer.get("exit", EXIT_INCOMPLETE))
    if "report" in answer:
        report = answer["report"]
        if not as_json:
            print_report(report)
        return 0 if report.get("complete") else EXIT_INCOMPLETE
    if not as_json:
        if "unsealed" in answer:
            print("node unsealed" if answer["unsealed"] else "node was not sealed")
        else:
            print(answer.get("seal") or "node not sealed")
    return 0


def print_report(report: dict[str, Any]) -> None:
    columns = ["volume", "backing", "outcome", "detail"]
    rows = [[str(v.get("volume_id", "")), str(v.get("backing", "")), str(v.get("outcome", "")),
             str(v.get("detail", ""))] for v in report.get("volumes", [])]  # fmt: skip
    if rows:
        table = [columns, *rows]
        widths = [max(len(r[i]) for r in table) for i in range(len(columns) - 1)]
        for row in table:
            cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)] + [row[-1]]
            print("  ".join(cells).rstrip())
    else:
        print("(no volumes on this node)")
    print(report.get("summary", ""))
