"""Volume keys: CSPRNG bytes in a mutable buffer, zeroed in place, never rendered."""

from __future__ import annotations

import logging

import pytest

from csi.keys import PASSPHRASE_BYTES, VolumeKey, random_key


@pytest.mark.parametrize("size", [1, 32, PASSPHRASE_BYTES, 4096])
def test_random_key_has_the_requested_length(size: int) -> None:
    key = random_key(size)
    assert len(key) == size
    assert len(key.view) == size
    assert key.wiped is False


def test_two_keys_differ_and_are_not_zero() -> None:
    a, b = random_key(PASSPHRASE_BYTES), random_key(PASSPHRASE_BYTES)
    assert bytes(a.view) != bytes(b.view)
    assert any(a.view) and any(b.view)
    # 64 CSPRNG bytes: expect most distinct byte values, not a repeated pattern
    assert len(set(bytes(a.view))) > 16


def test_wipe_zeroes_the_buffer_in_place() -> None:
    buf = bytearray(range(1, 65))
    key = VolumeKey(buf)
    view = key.view  # a view taken before the wipe sees the zeros: no copy was made
    key.wipe()
    assert buf == bytearray(64)
    assert bytes(view) == bytes(64)
    assert key.wiped is True
    assert len(key) == 64


def test_view_after_wipe_raises() -> None:
    key = random_key(32)
    key.wipe()
    with pytest.raises(ValueError, match="wiped"):
        _ = key.view


def test_view_is_read_only() -> None:
    key = random_key(16)
    view = key.view
    assert view.readonly
    with pytest.raises(TypeError):
        view[0] = 0


def test_context_manager_wipes_on_exit_and_on_error() -> None:
    with random_key(32) as key:
        assert any(key.view)
    assert key.wiped
    buf = bytearray(b"\x07" * 32)
    with pytest.raises(RuntimeError), VolumeKey(buf) as other:
        raise RuntimeError("format failed")
    assert other.wiped
    assert buf == bytearray(32)


def test_wiped_checks_the_buffer_not_just_a_flag() -> None:
    buf = bytearray(b"\x01" * 8)
    key = VolumeKey(buf)
    key.wipe()
    buf[0] = 1  # someone wrote into it afterwards
    assert key.wiped is False


def test_repr_and_str_never_show_the_bytes(caplog: pytest.LogCaptureFixture) -> None:
    secret = bytes(range(200, 232))
    key = VolumeKey(bytearray(secret))
    renderings = [repr(key), str(key), f"{key}", f"{key!r}", format(key), str([key])]
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("test.keys").warning("key is %s", key)
    renderings.append(caplog.text)
    for text in renderings:
        assert "redacted" in text
        assert "32 bytes" in text
        assert secret.hex() not in text
        assert secret.hex()[:16] not in text
        assert repr(secret)[:20] not in text
        assert secret.decode("latin-1") not in text
    assert key.view.tobytes() == secret  # the key itself was intact all along


def test_key_has_no_instance_dict() -> None:
    key = random_key(16)
    assert not hasattr(key, "__dict__")  # nothing stray (e.g. a bytes copy) can be attached
    with pytest.raises(AttributeError):
        key.copy = b"x"  # type: ignore[attr-defined]
