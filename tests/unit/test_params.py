"""Pure tests of csi/params.py: quantities, volume attributes, mount flags and combinations."""

from __future__ import annotations

from dataclasses import replace

import pytest

from csi.errors import InvalidArgument
from csi.params import (
    ATTACHED_HEADER_BYTES,
    MiB,
    VolumeSpec,
    check_combination,
    format_bytes,
    parse_attributes,
    parse_quantity,
    validate_fs_type,
    validate_mount_flags,
    validate_mount_group,
)

GiB = 1024**3
BOUNDS = {"min_size": 16 * MiB, "max_size": 1024**4}


# --- parse_quantity -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512Mi", 512 * MiB),
        ("1Gi", GiB),
        ("10Gi", 10 * GiB),
        ("1G", 10**9),
        ("1k", 1000),
        ("2Ki", 2048),
        ("3M", 3 * 10**6),
        ("1Ti", 1024**4),
        ("1E", 10**18),
        ("1Ei", 2**60),
        ("4096", 4096),
        ("+1Ki", 1024),
        (" 1Mi ", MiB),
        ("1.5Gi", 3 * GiB // 2),
        (".5Ki", 512),
        ("0.25Mi", MiB // 4),
        ("0", 0),
    ],
)
def test_parse_quantity_accepts_kubernetes_forms(text: str, expected: int) -> None:
    assert parse_quantity(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.5", 1),  # half a byte is a whole byte
        ("1.0001", 2),
        ("1.1k", 1100),
        ("1.0001Ki", 1025),  # 1024.1024 rounds up, never down
        ("0.1Mi", 104858),  # 104857.6
    ],
)
def test_parse_quantity_rounds_decimals_up(text: str, expected: int) -> None:
    assert parse_quantity(text) == expected


@pytest.mark.parametrize(
    "text",
    ["-1", "-1Gi", "1.5.5", "10XB", "", "   ", "Mi", "1 Mi", "1K", "1gi", "1Gib", "0x10", "1.",
     "Gi1", "1Gi\n2"],
)  # fmt: skip
def test_parse_quantity_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_quantity(text)
    assert "is not a size" in str(err.value)
    assert "512Mi" in str(err.value)  # says what a good value looks like


def test_parse_quantity_huge_value_is_a_number_not_an_error() -> None:
    # the bound check belongs to the caller: here we only need an exact, huge int
    assert parse_quantity("1000000Ei") == 10**6 * 2**60
    assert parse_quantity("9" * 40) > 10**39


def test_parse_quantity_is_exact_beyond_28_digits() -> None:
    assert parse_quantity("12345678901234567890123456781") == 12345678901234567890123456781
    assert parse_quantity("1.00000000000000000000000000001Ki") == 1025


# --- parse_attributes ---------------------------------------------------------------------


def test_parse_attributes_defaults() -> None:
    assert parse_attributes({}, **BOUNDS) == {
        "size": GiB,
        "backing": "loop",
        "preallocate": False,
        "integrity": "none",
        "header": "detached",
        "cipher": "aes-xts-plain64",
    }


def test_parse_attributes_every_value() -> None:
    fields = parse_attributes(
        {
            "size": "512Mi",
            "backing": "qcow2",
            "preallocate": "true",
            "integrity": "hmac-sha256",
            "header": "attached",
            "cipher": "xchacha12,aes-adiantum-plain64",
        },
        **BOUNDS,
    )
    assert fields == {
        "size": 512 * MiB,
        "backing": "qcow2",
        "preallocate": True,
        "integrity": "hmac-sha256",
        "header": "attached",
        "cipher": "xchacha12,aes-adiantum-plain64",
    }


def test_parse_attributes_ignores_co_keys() -> None:
    fields = parse_attributes(
        {
            "csi.storage.k8s.io/ephemeral": "true",
            "csi.storage.k8s.io/pod.name": "web-0",
            "size": "64Mi",
        },
        **BOUNDS,
    )
    assert fields["size"] == 64 * MiB


@pytest.mark.parametrize("key", ["sise", "Size", "encryption", "example.com/size"])
def test_parse_attributes_unknown_key_is_named(key: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_attributes({key: "1"}, **BOUNDS)
    assert repr(key) in str(err.value)
    assert "supported:" in str(err.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [("backing", "nbd"), ("preallocate", "yes"), ("preallocate", "True"),
     ("integrity", "hmac-sha512"), ("header", "none"), ("cipher", "aes-cbc-essiv:sha256")],
)  # fmt: skip
def test_parse_attributes_bad_choice_names_key_and_choices(key: str, value: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_attributes({key: value}, **BOUNDS)
    message = str(err.value)
    assert f"{key}={value!r}" in message
    assert "use one of" in message


def test_parse_attributes_rounds_size_up_to_whole_mib() -> None:
    assert parse_attributes({"size": "1G"}, **BOUNDS)["size"] == 954 * MiB  # 953.67Mi
    assert parse_attributes({"size": "16777217"}, **BOUNDS)["size"] == 17 * MiB


def test_parse_attributes_size_bounds() -> None:
    assert parse_attributes({"size": "16Mi"}, **BOUNDS)["size"] == 16 * MiB
    with pytest.raises(InvalidArgument, match="below this node's minimum 16Mi"):
        parse_attributes({"size": "15Mi"}, **BOUNDS)
    with pytest.raises(InvalidArgument, match="above this node's maximum 1Ti"):
        parse_attributes({"size": "1025Gi"}, **BOUNDS)
    with pytest.raises(InvalidArgument, match="above this node's maximum"):
        parse_attributes({"size": "99999999999999Ei"}, **BOUNDS)


def test_parse_attributes_bad_size_names_parameter() -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_attributes({"size": "lots"}, **BOUNDS)
    assert str(err.value).startswith("parameter size:")
    assert "'lots'" in str(err.value)


# --- fs type, mount flags, mount group ----------------------------------------------------


def test_validate_fs_type() -> None:
    assert validate_fs_type("") == "ext4"
    assert validate_fs_type("ext4") == "ext4"
    assert validate_fs_type("xfs") == "xfs"
    with pytest.raises(InvalidArgument, match="'btrfs' is not supported; use one of ext4, xfs"):
        validate_fs_type("btrfs")


def test_validate_mount_flags_splits_dedupes_keeps_order() -> None:
    flags = ["noatime,discard", " noexec ", "noatime", "", "commit=30", "data=ordered"]
    assert validate_mount_flags(flags) == (
        "noatime", "discard", "noexec", "commit=30", "data=ordered"
    )  # fmt: skip
    assert validate_mount_flags([]) == ()


@pytest.mark.parametrize(
    "flag",
    ["suid", "dev", "exec", "remount", "bind", "rbind", "uid=0", "context=system_u",
     "commit=5;reboot", "commit=", "data=../x", "defaults"],
)  # fmt: skip
def test_validate_mount_flags_refuses(flag: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_mount_flags(["noatime", flag])
    assert f"mount flag {flag!r} is not allowed" in str(err.value)


def test_validate_mount_group() -> None:
    assert validate_mount_group("") == ""
    assert validate_mount_group("1000") == "1000"
    for bad in ("staff", "-1", "10 00", "0x10"):
        with pytest.raises(InvalidArgument, match="must be a numeric group id"):
            validate_mount_group(bad)


# --- check_combination and VolumeSpec -----------------------------------------------------


def test_check_combination_accepts_supported() -> None:
    check_combination(VolumeSpec(size=64 * MiB))
    check_combination(VolumeSpec(size=300 * MiB, fs_type="xfs"))
    check_combination(VolumeSpec(size=64 * MiB, integrity="hmac-sha256"))
    check_combination(VolumeSpec(size=64 * MiB, cipher="xchacha12,aes-adiantum-plain64"))


def test_qcow2_is_a_valid_combination_and_charges_its_tables() -> None:
    spec = VolumeSpec(size=64 * MiB, backing="qcow2", header="attached")
    check_combination(spec)
    assert spec.disk_bytes > spec.backing_bytes > spec.size
    loop = VolumeSpec(size=64 * MiB)
    assert loop.disk_bytes == loop.backing_bytes == loop.size


def test_check_combination_refuses_integrity_without_aes() -> None:
    spec = VolumeSpec(size=64 * MiB, integrity="hmac-sha256",
                      cipher="xchacha12,aes-adiantum-plain64")  # fmt: skip
    with pytest.raises(InvalidArgument, match="only with cipher=aes-xts-plain64"):
        check_combination(spec)


def test_check_combination_refuses_small_xfs() -> None:
    with pytest.raises(InvalidArgument) as err:
        check_combination(VolumeSpec(size=299 * MiB, fs_type="xfs"))
    assert "xfs needs at least 300Mi" in str(err.value)
    assert "size=299Mi" in str(err.value)


def test_volume_spec_backing_bytes_and_json_round_trip() -> None:
    spec = VolumeSpec(size=64 * MiB, mount_flags=("noatime", "discard"), mount_group="42")
    assert spec.backing_bytes == 64 * MiB
    attached = replace(spec, header="attached")
    assert attached.backing_bytes == 64 * MiB + ATTACHED_HEADER_BYTES
    data = attached.to_json()
    assert data["mount_flags"] == ["noatime", "discard"]
    assert VolumeSpec.from_json(data) == attached


def test_format_bytes() -> None:
    assert format_bytes(GiB) == "1Gi"
    assert format_bytes(1536 * MiB) == "1536Mi"
    assert format_bytes(1024**4) == "1Ti"
    assert format_bytes(1000) == "1000"
