"""Pure tests of csi/params.py: quantities, volume attributes, mount flags and combinations."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from csi.backings.luks import ATTACHED_HEADER_BYTES
from csi.errors import InvalidArgument
from csi.params import (
    MAX_KEY_LENGTH,
    MAX_MOUNT_FLAGS,
    MAX_QUANTITY_LENGTH,
    MAX_VALUE_LENGTH,
    MiB,
    VolumeSpec,
    check_combination,
    format_bytes,
    parse_attributes,
    parse_quantity,
    quoted,
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
    assert parse_quantity("9" * MAX_QUANTITY_LENGTH) > 10**31
    assert parse_quantity("9" * (MAX_QUANTITY_LENGTH - 2) + "Ei") > 10**47


def test_parse_quantity_is_exact_beyond_28_digits() -> None:
    assert parse_quantity("12345678901234567890123456781") == 12345678901234567890123456781
    assert parse_quantity("1." + "0" * 27 + "1Ki") == 1025


@pytest.mark.parametrize(
    "text",
    ["9" * 10**6, "9" * (10**6 + 1) + "Gi", "9" * 400 + "Gi", "1" + "0" * MAX_QUANTITY_LENGTH,
     " " * 40 + "1Gi", "0." + "0" * 100 + "1Ki"],
    ids=["million-digits", "million-digits-Gi", "400-digits-Gi", "33-digits", "padded", "fraction"],
)  # fmt: skip
def test_parse_quantity_refuses_long_text_before_parsing(text: str) -> None:
    """A million digits took ~30 s (or ended in decimal.Overflow) while holding the GIL."""
    with pytest.raises(InvalidArgument) as err:
        parse_quantity(text)
    message = str(err.value)
    assert "is not a size" in message and f"at most {MAX_QUANTITY_LENGTH} characters" in message
    assert len(message) < 200, message


# --- quoting user input in messages -------------------------------------------------------


def test_quoted_keeps_short_values_whole() -> None:
    assert quoted("btrfs") == "'btrfs'"
    assert quoted("x" * 32) == repr("x" * 32)


def test_quoted_cuts_long_values_to_a_prefix() -> None:
    text = quoted("ab" * 5000)
    assert text == repr("ab" * 16) + "... (10000 characters)"


def test_quoted_bounds_escaped_characters_too() -> None:
    text = quoted("\0" * 10000)  # repr shows each as four characters
    assert len(text) < 100, text
    assert text.startswith("'\\x00") and text.endswith("... (10000 characters)")
    assert quoted("\U000e0001" * 3) == repr("\U000e0001" * 3)


LONG = "A" * 10000  # 10k characters of CO input


@pytest.mark.parametrize(
    "call",
    [
        lambda: parse_quantity(LONG),
        lambda: parse_attributes({"size": LONG}, **BOUNDS),
        lambda: parse_attributes({"backing": LONG}, **BOUNDS),
        lambda: parse_attributes({"csi.storage.k8s.io/pod.name": LONG}, **BOUNDS),
        lambda: parse_attributes({LONG: "1"}, **BOUNDS),
        lambda: parse_attributes({"x" * MAX_KEY_LENGTH: "1"}, **BOUNDS),
        lambda: parse_attributes({"cipher": "A" * MAX_VALUE_LENGTH}, **BOUNDS),
        lambda: validate_fs_type(LONG),
        lambda: validate_mount_flags([LONG[:1000]]),
        lambda: validate_mount_flags([LONG]),
        lambda: validate_mount_group(LONG),
    ],
    ids=["quantity", "size", "choice", "co-key", "long-key", "unknown-key", "choice-at-bound",
         "fs-type", "mount-flag", "mount-flags", "mount-group"],
)  # fmt: skip
def test_messages_quote_only_a_short_prefix_of_a_bad_value(call: Callable[[], object]) -> None:
    with pytest.raises(InvalidArgument) as err:
        call()
    message = str(err.value)
    assert len(message) < 300, message
    assert "A" * 40 not in message and "x" * 40 not in message


# --- parse_attributes ---------------------------------------------------------------------


def test_parse_attributes_defaults() -> None:
    assert parse_attributes({}, **BOUNDS) == {
        "size": GiB,
        "backing": "loop",
        "preallocate": False,
        "integrity": "none",
        "header": "detached",
        "cipher": "aes-xts-plain64",
        "kata": "off",
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
            "kata": "host",
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
        "kata": "host",
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


def test_parse_attributes_bounds_key_and_value_lengths() -> None:
    name = "p" * MAX_VALUE_LENGTH  # the longest pod name kubelet can pass is fine
    fields = parse_attributes({"csi.storage.k8s.io/pod.name": name, "size": "64Mi"}, **BOUNDS)
    assert fields["size"] == 64 * MiB
    with pytest.raises(InvalidArgument, match=f"a value has at most {MAX_VALUE_LENGTH} char"):
        parse_attributes({"csi.storage.k8s.io/pod.name": name + "p"}, **BOUNDS)
    key = "csi.storage.k8s.io/" + "k" * (MAX_KEY_LENGTH - 18)
    with pytest.raises(InvalidArgument, match=f"a key has at most {MAX_KEY_LENGTH} char"):
        parse_attributes({key: "1"}, **BOUNDS)


def test_parse_attributes_refuses_a_million_digit_size_by_its_length() -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_attributes({"size": "9" * 10**6}, **BOUNDS)
    assert "parameter 'size'='99999" in str(err.value)
    assert "(1000000 characters) is too long" in str(err.value)


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


def test_validate_mount_flags_bounds_count_and_length() -> None:
    assert validate_mount_flags(["noatime"] * MAX_MOUNT_FLAGS) == ("noatime",)
    with pytest.raises(InvalidArgument, match=f"at most {MAX_MOUNT_FLAGS} entries"):
        validate_mount_flags(["noatime"] * (MAX_MOUNT_FLAGS + 1))
    many = ",".join(f"commit={n}" for n in range(200_000))  # distinct, each allowed
    with pytest.raises(InvalidArgument, match="1024 characters in all"):
        validate_mount_flags([many])
    with pytest.raises(InvalidArgument, match="is not allowed"):
        validate_mount_flags(["commit=" + "1" * 33])


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
