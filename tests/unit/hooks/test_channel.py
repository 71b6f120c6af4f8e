"""The hook channel's wire format (recnix.hooks.channel): request lines in, control
requests out; replies the bash hook can read line by line."""

from __future__ import annotations

import pytest

from recnix.hooks import channel

DRV = "/nix/store/0sm93azza052sd0lrsk9k4b958m29j4c-x.drv"


def test_open_request():
    token, message = channel.parse_request(f"1 open 42.9 7 {DRV} {DRV}.chroot".encode())
    assert token == "42.9" and channel.reply_name(token) == "r.42.9"
    assert message == {"op": "open", "drv": DRV, "worker": 7, "chroot": f"{DRV}.chroot"}


@pytest.mark.parametrize("outs", [[], ["/nix/store/a-x"], ["/nix/store/a-x", "/nix/store/b-x-dev"]])
def test_finalise_request(outs):
    line = " ".join(["1", "finalise", "42.0", "7", DRV, *outs]).encode()
    token, message = channel.parse_request(line)
    assert (token, message["op"], message["out_paths"]) == ("42.0", "finalise", outs)


@pytest.mark.parametrize(
    ("line", "token"),
    [
        (b"", None),
        (b"2 open 42.1 7 /d /c", "42.1"),  # another version
        (b"1 status 42.1 7 /d /c", "42.1"),  # not an op of the channel
        (b"1 open 42 7 /d /c", None),  # no random part
        (b"1 open 0.1 7 /d /c", None),
        (b"1 open 42.1/../x 7 /d /c", None),
        (b"1 open 42.1 x /d /c", "42.1"),
        (b"1 open -1.1 7 /d /c", None),
        (b"1 open 42.1 7 d /c", "42.1"),  # not absolute
        (b"1 open 42.1 7 /d", "42.1"),  # no chroot
        (b"1 open 42.1 7 /d /c /e", "42.1"),
        (b"1 finalise 42.1 7 /d  /o", "42.1"),  # an empty word
        (b"1 finalise 42.1 7 /nix/store/a b.drv", "42.1"),  # a path with a space
        (b"1 open 42.1 7 /d \xff", "42.1"),
        (b"1 open 42.1 7", "42.1"),
    ],
)
def test_malformed_requests_are_refused_with_a_reason(line, token):
    """...and the reply token, whenever the line has one, so that its hook is told."""
    with pytest.raises(channel.ChannelRequestError) as e:
        channel.parse_request(line)
    assert str(e.value)
    assert e.value.token == token


def test_reply_lines_cannot_end_the_reply_early_or_add_lines():
    data = channel.render_reply("ok", ["a\nb", ".", ""])
    assert data.decode().split("\n") == ["ok", "a b", " .", "", ".", ""]


def test_a_long_reply_is_cut_and_says_so():
    data = channel.render_reply("ok", [f"message {i} " + "x" * 200 for i in range(1000)])
    assert len(data) <= channel.MAX_REPLY
    lines = data.decode().split("\n")
    assert lines[-2:] == [".", ""] and "1000 lines" in lines[-3]


def test_what_the_hook_prints():
    assert channel.reply_lines("open", {"ok": True, "socket": None}, "/s") == []
    assert channel.reply_lines("open", {"socket_dir": "/run/x"}, "/s") == [
        "extra-sandbox-paths",
        "/s=/run/x",
        "",
    ]
    assert channel.reply_lines("finalise", {"messages": ["m"]}, "/s") == ["m"]


def test_the_hook_script_keeps_its_requests_within_the_atomic_bound():
    """bin/recnix-hook-channel sends a line only below MAX_REQUEST (one atomic FIFO
    write: under PIPE_BUF), and falls back to the Python hook above it."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[3] / "bin" / "recnix-hook-channel"
    assert f"[ ${{#line}} -lt {channel.MAX_REQUEST} ]" in script.read_text()
    assert channel.MAX_REQUEST < 4096  # PIPE_BUF on Linux
