"""The hand-written csi.proto and its generated stubs.

* the committed stubs match what tools/gen_proto.py produces today;
* wire numbers of the messages the driver relies on match CSI spec v1.10;
* every ``secrets`` field carries the ``csi_secret`` option, so anything that
  redacts by that option (logging, debug dumps) covers all of them.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, cast

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.descriptor_pb2 import FieldOptions

if TYPE_CHECKING:
    from google._upb import _message as upb
    from google.protobuf.internal.extension_dict import _ExtensionFieldDescriptor

    # The stubs type a message class's DESCRIPTOR as pure-python | upb descriptor.
    AnyDescriptor = Descriptor | upb.Descriptor
    AnyEnumDescriptor = EnumDescriptor | upb.EnumDescriptor

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # the package is not installed in the dev venv
    sys.path.insert(0, str(REPO_ROOT))

from csi.proto import csi_pb2, csi_pb2_grpc  # noqa: E402


def _load_gen_proto() -> ModuleType:
    """Import tools/gen_proto.py by path (tools/ is not a package)."""
    path = REPO_ROOT / "tools" / "gen_proto.py"
    spec = importlib.util.spec_from_file_location("gen_proto", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _numbers(message: AnyDescriptor) -> dict[str, int]:
    return {field.name: field.number for field in message.fields}


def _enum_values(enum: AnyEnumDescriptor) -> dict[str, int]:
    return {value.name: value.number for value in enum.values}


def _all_messages() -> Iterator[Descriptor]:
    """Every message in csi.proto, nested ones (incl. map entries) too."""
    pending: list[Descriptor] = list(csi_pb2.DESCRIPTOR.message_types_by_name.values())
    while pending:
        message = pending.pop()
        yield message
        pending.extend(message.nested_types)


def _is_secret(field: FieldDescriptor) -> bool:
    csi_secret = cast("_ExtensionFieldDescriptor[FieldOptions, bool]", csi_pb2.csi_secret)
    return bool(field.GetOptions().Extensions[csi_secret])


# --- (1) generated code is current -------------------------------------------------


def test_generated_stubs_are_current() -> None:
    gen_proto = _load_gen_proto()
    stale: list[str] = gen_proto.stale_stubs(REPO_ROOT)
    assert not stale, (
        "generated stubs differ from csi/proto/csi.proto, run `python tools/gen_proto.py`: "
        + ", ".join(stale)
    )


def test_staleness_check_notices_an_edit(tmp_path: Path) -> None:
    gen_proto = _load_gen_proto()
    stub_dir = tmp_path / "csi" / "proto"
    shutil.copytree(REPO_ROOT / "csi" / "proto", stub_dir)
    assert gen_proto.stale_stubs(tmp_path) == []

    grpc_stub = stub_dir / "csi_pb2_grpc.py"
    grpc_stub.write_text(grpc_stub.read_text() + "\n# local edit\n")
    (stub_dir / "csi_pb2.pyi").unlink()
    assert gen_proto.stale_stubs(tmp_path) == ["csi/proto/csi_pb2_grpc.py", "csi/proto/csi_pb2.pyi"]


def test_stubs_import_as_package_modules() -> None:
    assert csi_pb2.DESCRIPTOR.name == "csi/proto/csi.proto"
    assert csi_pb2.DESCRIPTOR.package == "csi.v1"
    grpc_source = (REPO_ROOT / "csi" / "proto" / "csi_pb2_grpc.py").read_text()
    assert "from csi.proto import csi_pb2 as " in grpc_source
    assert csi_pb2_grpc.csi_dot_proto_dot_csi__pb2 is csi_pb2


# --- (2) wire numbers against the spec ---------------------------------------------


def test_option_extension_numbers() -> None:
    assert csi_pb2.csi_secret.number == 1059
    extended = csi_pb2.csi_secret.containing_type
    assert extended is not None and extended.full_name == "google.protobuf.FieldOptions"
    for name, options in [
        ("alpha_field", "FieldOptions"),
        ("alpha_enum", "EnumOptions"),
        ("alpha_enum_value", "EnumValueOptions"),
        ("alpha_message", "MessageOptions"),
        ("alpha_method", "MethodOptions"),
        ("alpha_service", "ServiceOptions"),
    ]:
        extension: FieldDescriptor = getattr(csi_pb2, name)
        assert extension.number == 1060, name
        extended = extension.containing_type
        assert extended is not None and extended.full_name == f"google.protobuf.{options}", name


def test_services_and_rpcs() -> None:
    services = {
        name: [method.name for method in service.methods]
        for name, service in csi_pb2.DESCRIPTOR.services_by_name.items()
    }
    assert services == {
        "Identity": ["GetPluginInfo", "GetPluginCapabilities", "Probe"],
        "Controller": [
            "CreateVolume",
            "DeleteVolume",
            "ControllerPublishVolume",
            "ControllerUnpublishVolume",
            "ValidateVolumeCapabilities",
            "ListVolumes",
            "GetCapacity",
            "ControllerGetCapabilities",
            "CreateSnapshot",
            "DeleteSnapshot",
            "ListSnapshots",
            "ControllerExpandVolume",
            "ControllerGetVolume",
            "ControllerModifyVolume",
        ],
        "Node": [
            "NodeStageVolume",
            "NodeUnstageVolume",
            "NodePublishVolume",
            "NodeUnpublishVolume",
            "NodeGetVolumeStats",
            "NodeExpandVolume",
            "NodeGetCapabilities",
            "NodeGetInfo",
        ],
    }
    node = csi_pb2.DESCRIPTOR.services_by_name["Node"]
    publish = node.methods_by_name["NodePublishVolume"]
    assert publish.full_name == "csi.v1.Node.NodePublishVolume"
    assert publish.input_type is csi_pb2.NodePublishVolumeRequest.DESCRIPTOR
    assert publish.output_type is csi_pb2.NodePublishVolumeResponse.DESCRIPTOR


def test_node_publish_volume_request() -> None:
    message = csi_pb2.NodePublishVolumeRequest.DESCRIPTOR
    assert _numbers(message) == {
        "volume_id": 1,
        "publish_context": 2,
        "staging_target_path": 3,
        "target_path": 4,
        "volume_capability": 5,
        "readonly": 6,
        "secrets": 7,
        "volume_context": 8,
    }
    fields = message.fields_by_name
    assert fields["readonly"].type == FieldDescriptor.TYPE_BOOL
    assert fields["target_path"].type == FieldDescriptor.TYPE_STRING
    assert fields["volume_capability"].message_type is csi_pb2.VolumeCapability.DESCRIPTOR
    context_entry = fields["volume_context"].message_type
    assert context_entry is not None and context_entry.GetOptions().map_entry


def test_node_stage_and_unpublish_requests() -> None:
    assert _numbers(csi_pb2.NodeStageVolumeRequest.DESCRIPTOR) == {
        "volume_id": 1,
        "publish_context": 2,
        "staging_target_path": 3,
        "volume_capability": 4,
        "secrets": 5,
        "volume_context": 6,
    }
    assert _numbers(csi_pb2.NodeUnpublishVolumeRequest.DESCRIPTOR) == {
        "volume_id": 1,
        "target_path": 2,
    }


def test_node_get_volume_stats() -> None:
    assert _numbers(csi_pb2.NodeGetVolumeStatsRequest.DESCRIPTOR) == {
        "volume_id": 1,
        "volume_path": 2,
        "staging_target_path": 3,
    }
    response = csi_pb2.NodeGetVolumeStatsResponse.DESCRIPTOR
    assert _numbers(response) == {"usage": 1, "volume_condition": 2}
    assert response.fields_by_name["usage"].is_repeated
    usage = csi_pb2.VolumeUsage.DESCRIPTOR
    assert _numbers(usage) == {"available": 1, "total": 2, "used": 3, "unit": 4}
    assert usage.fields_by_name["available"].type == FieldDescriptor.TYPE_INT64
    assert _enum_values(usage.enum_types_by_name["Unit"]) == {
        "UNKNOWN": 0,
        "BYTES": 1,
        "INODES": 2,
    }
    assert _numbers(csi_pb2.VolumeCondition.DESCRIPTOR) == {"abnormal": 1, "message": 2}


def test_node_get_info_and_capabilities() -> None:
    info = csi_pb2.NodeGetInfoResponse.DESCRIPTOR
    assert _numbers(info) == {"node_id": 1, "max_volumes_per_node": 2, "accessible_topology": 3}
    assert info.fields_by_name["max_volumes_per_node"].type == FieldDescriptor.TYPE_INT64
    rpc = csi_pb2.NodeServiceCapability.RPC.DESCRIPTOR
    assert _enum_values(rpc.enum_types_by_name["Type"]) == {
        "UNKNOWN": 0,
        "STAGE_UNSTAGE_VOLUME": 1,
        "GET_VOLUME_STATS": 2,
        "EXPAND_VOLUME": 3,
        "VOLUME_CONDITION": 4,
        "SINGLE_NODE_MULTI_WRITER": 5,
        "VOLUME_MOUNT_GROUP": 6,
    }


def test_create_volume_request() -> None:
    message = csi_pb2.CreateVolumeRequest.DESCRIPTOR
    assert _numbers(message) == {
        "name": 1,
        "capacity_range": 2,
        "volume_capabilities": 3,
        "parameters": 4,
        "secrets": 5,
        "volume_content_source": 6,
        "accessibility_requirements": 7,
        "mutable_parameters": 8,
    }
    assert _numbers(csi_pb2.CapacityRange.DESCRIPTOR) == {"required_bytes": 1, "limit_bytes": 2}
    source = csi_pb2.VolumeContentSource.DESCRIPTOR
    assert _numbers(source) == {"snapshot": 1, "volume": 2}
    assert [f.name for f in source.oneofs_by_name["type"].fields] == ["snapshot", "volume"]
    assert _numbers(csi_pb2.Volume.DESCRIPTOR) == {
        "capacity_bytes": 1,
        "volume_id": 2,
        "volume_context": 3,
        "content_source": 4,
        "accessible_topology": 5,
    }
    assert _numbers(csi_pb2.Topology.DESCRIPTOR) == {"segments": 1}


def test_volume_capability() -> None:
    capability = csi_pb2.VolumeCapability.DESCRIPTOR
    assert _numbers(capability) == {"block": 1, "mount": 2, "access_mode": 3}
    assert [f.name for f in capability.oneofs_by_name["access_type"].fields] == ["block", "mount"]
    assert _numbers(csi_pb2.VolumeCapability.MountVolume.DESCRIPTOR) == {
        "fs_type": 1,
        "mount_flags": 2,
        "volume_mount_group": 3,
    }
    mode = csi_pb2.VolumeCapability.AccessMode.DESCRIPTOR.enum_types_by_name["Mode"]
    assert _enum_values(mode) == {
        "UNKNOWN": 0,
        "SINGLE_NODE_WRITER": 1,
        "SINGLE_NODE_READER_ONLY": 2,
        "MULTI_NODE_READER_ONLY": 3,
        "MULTI_NODE_SINGLE_WRITER": 4,
        "MULTI_NODE_MULTI_WRITER": 5,
        "SINGLE_NODE_SINGLE_WRITER": 6,
        "SINGLE_NODE_MULTI_WRITER": 7,
    }


def test_identity_messages() -> None:
    assert _numbers(csi_pb2.GetPluginInfoResponse.DESCRIPTOR) == {
        "name": 1,
        "vendor_version": 2,
        "manifest": 3,
    }
    probe = csi_pb2.ProbeResponse.DESCRIPTOR.fields_by_name["ready"]
    assert probe.number == 1
    assert probe.message_type is not None
    assert probe.message_type.full_name == "google.protobuf.BoolValue"
    service = csi_pb2.PluginCapability.Service.DESCRIPTOR
    assert _enum_values(service.enum_types_by_name["Type"]) == {
        "UNKNOWN": 0,
        "CONTROLLER_SERVICE": 1,
        "VOLUME_ACCESSIBILITY_CONSTRAINTS": 2,
        "GROUP_CONTROLLER_SERVICE": 3,
        "SNAPSHOT_METADATA_SERVICE": 4,
    }
    assert _numbers(csi_pb2.PluginCapability.DESCRIPTOR) == {"service": 1, "volume_expansion": 2}


def test_controller_capabilities_and_snapshot() -> None:
    rpc = csi_pb2.ControllerServiceCapability.RPC.DESCRIPTOR
    values = _enum_values(rpc.enum_types_by_name["Type"])
    assert values["CREATE_DELETE_VOLUME"] == 1
    assert values["LIST_VOLUMES_PUBLISHED_NODES"] == 10
    assert values["SINGLE_NODE_MULTI_WRITER"] == 13
    assert values["MODIFY_VOLUME"] == 14
    assert sorted(values.values()) == list(range(15))
    snapshot = csi_pb2.Snapshot.DESCRIPTOR
    assert _numbers(snapshot) == {
        "size_bytes": 1,
        "snapshot_id": 2,
        "source_volume_id": 3,
        "creation_time": 4,
        "ready_to_use": 5,
        "group_snapshot_id": 6,
    }
    timestamp = snapshot.fields_by_name["creation_time"].message_type
    assert timestamp is not None and timestamp.full_name == "google.protobuf.Timestamp"


# --- (3) csi_secret marking --------------------------------------------------------


def test_every_secrets_field_is_marked_csi_secret() -> None:
    secrets_fields: list[str] = []
    marked: list[str] = []
    for message in _all_messages():
        for field in message.fields:
            if field.name == "secrets":
                secrets_fields.append(field.full_name)
            if _is_secret(field):
                marked.append(field.full_name)
    unmarked = sorted(set(secrets_fields) - set(marked))
    assert not unmarked, f"secrets fields without [(csi_secret) = true]: {unmarked}"
    assert sorted(marked) == sorted(secrets_fields), "csi_secret on a non-secrets field"
    assert len(secrets_fields) >= 5
    assert "csi.v1.NodePublishVolumeRequest.secrets" in secrets_fields


@pytest.mark.parametrize(
    "message_name",
    ["NodePublishVolumeRequest", "NodeStageVolumeRequest", "CreateVolumeRequest"],
)
def test_secrets_are_string_maps(message_name: str) -> None:
    field = getattr(csi_pb2, message_name).DESCRIPTOR.fields_by_name["secrets"]
    entry = field.message_type
    assert entry.GetOptions().map_entry
    assert entry.fields_by_name["key"].type == FieldDescriptor.TYPE_STRING
    assert entry.fields_by_name["value"].type == FieldDescriptor.TYPE_STRING
