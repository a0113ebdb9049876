"""The lifecycle's step names, in order: one list that the lifecycle times, the metrics
pre-declare, the benchmark reports and the dashboard charts."""

from __future__ import annotations

# reserve capacity, then what a LUKS backing does to prepare a volume, then how it is exposed
RESERVE = "reserve"
PREPARE_STEPS = ("create_backing", "attach", "format", "open", "mkfs")
DIRECTORY_STEPS = ("make_dir", "add_key")  # what the fscrypt backing does instead
PUBLISH_STEPS = (RESERVE, *PREPARE_STEPS, "mount", "record")  # an inline publish
STAGE_STEPS = (*PREPARE_STEPS, "mount", "record")  # a PVC's NodeStageVolume
BIND_STEPS = ("bind",)  # a PVC's NodePublishVolume into one pod
TEARDOWN_STEPS = ("unmount", "close", "detach", "delete", "forget")
EXPAND_STEPS = ("reserve_growth", "grow_backing", "refresh_loop", "resize_mapping", "grow_fs",
                "record")  # fmt: skip
ALL_STEPS = tuple(dict.fromkeys((*PUBLISH_STEPS, *DIRECTORY_STEPS, *TEARDOWN_STEPS,
                                 *STAGE_STEPS, *BIND_STEPS, *EXPAND_STEPS)))  # fmt: skip
