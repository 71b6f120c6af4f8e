"""NAR parser, writer, restore and reference scanner (pure: temp directories only)."""

from __future__ import annotations

import os
import stat
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recnix.protocol.errors import ProtocolError
from recnix.protocol.nar import (
    Contents,
    Directory,
    File,
    FileEnd,
    NarParser,
    Symlink,
    dump_path,
    nar_hash,
    restore_nar,
    scan_for_hashes,
)


def tok(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data + b"\0" * (-len(data) % 8)


def toks(*items: bytes) -> bytes:
    return b"".join(tok(i) for i in items)


MAGIC = tok(b"nix-archive-1")


def regular(contents: bytes, executable: bool = False) -> bytes:
    exe = toks(b"executable", b"") if executable else b""
    return toks(b"(", b"type", b"regular") + exe + toks(b"contents", contents, b")")


def directory(*entries: tuple[bytes, bytes]) -> bytes:
    body = b"".join(
        toks(b"entry", b"(", b"name", name, b"node") + node + tok(b")") for name, node in entries
    )
    return toks(b"(", b"type", b"directory") + body + tok(b")")


def symlink(target: bytes) -> bytes:
    return toks(b"(", b"type", b"symlink", b"target", target, b")")


def parse_all(nar: bytes, step: int | None = None) -> tuple[NarParser, int]:
    p = NarParser(record_events=True)
    if step is None:
        return p, p.feed(nar)
    used = 0
    for i in range(0, len(nar), step):
        used += p.feed(nar[i : i + step])
    return p, used


# --- hand-built NARs -----------------------------------------------------------------------

SAMPLE = MAGIC + directory(
    (b"a", regular(b"hello")),
    (b"b", regular(b"", executable=True)),
    (b"c", symlink(b"../x")),
    (b"d", directory((b"e", regular(b"12345678")))),
)


def test_events_of_sample() -> None:
    p, used = parse_all(SAMPLE)
    assert p.done and used == len(SAMPLE)
    assert p.events() == [
        Directory(""),
        File("a", False, 5),
        Contents(b"hello"),
        FileEnd("a"),
        File("b", True, 0),
        FileEnd("b"),
        Symlink("c", b"../x"),
        Directory("d"),
        File("d/e", False, 8),
        Contents(b"12345678"),
        FileEnd("d/e"),
    ]
    assert p.events() == []  # drained


@pytest.mark.parametrize("step", [1, 3, 7, 8, 9, 64])
def test_feeding_in_pieces(step: int) -> None:
    p, used = parse_all(SAMPLE, step)
    assert p.done and used == len(SAMPLE)
    whole = b"".join(e.data for e in p.events() if isinstance(e, Contents))
    assert whole == b"hello12345678"


@pytest.mark.parametrize("garbage", [b"x", b"\0" * 8, SAMPLE])
def test_end_detection_with_trailing_bytes(garbage: bytes) -> None:
    p = NarParser()
    data = SAMPLE + garbage
    assert p.feed(data) == len(SAMPLE)
    assert p.done
    assert p.feed(b"more") == 0


def test_end_detection_byte_by_byte() -> None:
    p = NarParser()
    data = SAMPLE + b"trailing"
    used = [p.feed(data[i : i + 1]) for i in range(len(data))]
    assert used == [1] * len(SAMPLE) + [0] * len(b"trailing")


def test_incomplete_is_not_done() -> None:
    p = NarParser()
    assert p.feed(SAMPLE[:-1]) == len(SAMPLE) - 1
    assert not p.done


def _bad(nar: bytes, problem: str) -> ProtocolError:
    p = NarParser()
    with pytest.raises(ProtocolError) as exc:
        p.feed(nar)
    assert problem in str(exc.value), str(exc.value)
    assert exc.value.offset is not None
    with pytest.raises(ProtocolError):  # stays failed
        p.feed(b"")
    return exc.value


def test_bad_magic() -> None:
    e = _bad(tok(b"nix-archive-2") + regular(b""), "bad archive magic")
    assert e.offset == 0


def test_bad_token_with_offset() -> None:
    nar = MAGIC + toks(b"(", b"typo")
    e = _bad(nar, "expected 'type'")
    assert e.offset == len(MAGIC) + 16


def test_unknown_type() -> None:
    _bad(MAGIC + toks(b"(", b"type", b"fifo", b")"), "unknown node type")


def test_nonzero_padding_in_token() -> None:
    nar = MAGIC + tok(b"(")[:-1] + b"\1"
    _bad(nar, "non-zero padding")


def test_nonzero_padding_after_contents() -> None:
    good = MAGIC + regular(b"abc")
    i = good.index(b"abc") + 3
    _bad(good[:i] + b"\0\0\0\0\x07" + good[i + 5 :], "non-zero padding after file contents")


def test_executable_marker_must_be_empty() -> None:
    nar = MAGIC + toks(b"(", b"type", b"regular", b"executable", b"x")
    _bad(nar, "executable marker")


@pytest.mark.parametrize(
    ("entries", "problem"),
    [
        (((b"b", regular(b"")), (b"a", regular(b""))), "not sorted"),
        (((b"a", regular(b"")), (b"a", regular(b""))), "not sorted or duplicated"),
        (((b"", regular(b"")),), "invalid entry name"),
        (((b".", regular(b"")),), "invalid entry name"),
        (((b"..", regular(b"")),), "invalid entry name"),
        (((b"a/b", regular(b"")),), "invalid entry name"),
        (((b"a\0b", regular(b"")),), "invalid entry name"),
        (((b"x" * 256, regular(b"")),), "entry name length 256 exceeds limit"),
    ],
)
def test_bad_directory_entries(entries: tuple, problem: str) -> None:
    _bad(MAGIC + directory(*entries), problem)


def test_sorting_is_bytewise() -> None:
    # "B" (0x42) < "a" (0x61) < "\xc3\x89" bytewise, whatever the locale says
    nar = MAGIC + directory(
        (b"B", regular(b"")), (b"a", regular(b"")), ("\u00c9".encode(), regular(b""))
    )
    p, used = parse_all(nar)
    assert p.done and used == len(nar)


def test_huge_lengths_rejected_before_buffering() -> None:
    _bad(MAGIC + (1 << 40).to_bytes(8, "little"), "token length")
    nar = MAGIC + toks(b"(", b"type", b"symlink", b"target") + (5000).to_bytes(8, "little")
    _bad(nar, "symlink target length 5000 exceeds limit 4096")
    nar = MAGIC + toks(b"(", b"type", b"regular", b"contents") + (1 << 63).to_bytes(8, "little")
    _bad(nar, "file size")


def test_empty_symlink_target_rejected() -> None:
    _bad(MAGIC + symlink(b""), "empty symlink target")


def test_large_file_streams_in_bounded_memory() -> None:
    size = 64 << 20
    header = MAGIC + toks(b"(", b"type", b"regular", b"contents") + size.to_bytes(8, "little")
    seen = 0

    def on_event(ev: object) -> None:
        nonlocal seen
        if isinstance(ev, Contents):
            seen += len(ev.data)

    p = NarParser(on_event)
    block = b"\xab" * (1 << 20)
    tracemalloc.start()
    try:
        p.feed(header)
        for _ in range(size // len(block)):
            assert p.feed(block) == len(block)
        assert p.feed(tok(b")")) == 16
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert p.done and seen == size
    assert peak < 8 << 20, peak


# --- filesystem round trips ----------------------------------------------------------------

names = st.text(
    alphabet=st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=12,
).filter(lambda n: n not in (".", "..") and len(n.encode()) <= 255)

trees = st.recursive(
    st.one_of(
        st.tuples(st.just("file"), st.binary(max_size=300), st.booleans()),
        st.tuples(
            st.just("link"), st.text(min_size=1, max_size=20).filter(lambda t: "\0" not in t)
        ),
    ),
    lambda children: st.dictionaries(names, children, max_size=5).map(lambda d: ("dir", d)),
    max_leaves=20,
)


def build(path: Path, tree: tuple) -> None:
    if tree[0] == "file":
        path.write_bytes(tree[1])
        path.chmod(0o755 if tree[2] else 0o644)
    elif tree[0] == "link":
        path.symlink_to(tree[1])
    else:
        path.mkdir()
        for name, sub in tree[1].items():
            build(path / name, sub)


def read_tree(path: Path) -> tuple:
    st_ = os.lstat(path)
    if stat.S_ISLNK(st_.st_mode):
        return ("link", os.readlink(path))
    if stat.S_ISDIR(st_.st_mode):
        return ("dir", {n: read_tree(path / n) for n in os.listdir(path)})
    return ("file", path.read_bytes(), bool(st_.st_mode & stat.S_IXUSR))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tree=trees)
def test_dump_restore_round_trip(tmp_path_factory: pytest.TempPathFactory, tree: tuple) -> None:
    base = tmp_path_factory.mktemp("rt")
    build(base / "src", tree)
    nar = b"".join(dump_path(base / "src"))
    p, used = parse_all(nar, 5)
    assert p.done and used == len(nar)
    restore_nar([nar[i : i + 13] for i in range(0, len(nar), 13)], base / "dst")
    assert read_tree(base / "dst") == read_tree(base / "src")
    assert b"".join(dump_path(base / "dst")) == nar


def test_dump_uses_bytewise_order_and_chunks(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for n in ["b", "B", "a", "\u00e9", "_", "A b"]:
        (src / n).write_text(n)
    (src / "big").write_bytes(os.urandom(300_000))
    chunks = list(dump_path(src))
    assert len(chunks) > 1
    p = NarParser(record_events=True)
    p.feed(b"".join(chunks))
    files = [e.path for e in p.events() if isinstance(e, File)]
    assert files == sorted(files, key=os.fsencode) == ["A b", "B", "_", "a", "b", "big", "\u00e9"]


def test_dump_single_file_and_symlink(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    f.chmod(0o700)
    assert b"".join(dump_path(f)) == MAGIC + regular(b"abc", executable=True)
    (tmp_path / "l").symlink_to("nowhere")
    assert b"".join(dump_path(tmp_path / "l")) == MAGIC + symlink(b"nowhere")


def test_dump_rejects_special_files(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OSError, match="unsupported type"):
        b"".join(dump_path(tmp_path / "fifo"))


def test_restore_rejects_truncated_and_trailing(tmp_path: Path) -> None:
    with pytest.raises(ProtocolError, match="truncated"):
        restore_nar([SAMPLE[:-8]], tmp_path / "a")
    with pytest.raises(ProtocolError, match="trailing data"):
        restore_nar([SAMPLE + b"x"], tmp_path / "b")
    with pytest.raises(FileExistsError):
        restore_nar([SAMPLE], tmp_path)


def test_nar_hash_of_file(tmp_path: Path) -> None:
    import hashlib

    from recnix.formats.storepath import nix32_encode

    f = tmp_path / "f"
    f.write_bytes(b"hello")
    nar = MAGIC + regular(b"hello")
    assert nar_hash(f) == ("sha256:" + nix32_encode(hashlib.sha256(nar).digest()), len(nar))


# --- reference scanning --------------------------------------------------------------------

HASHES = [
    "00bgd045z0d4icpbc2yyz4gx48ak44la",
    "c015dhfh5l0lp6wxyvdn7bmwhbbr6hr9",
    "g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q",
    "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
]


@pytest.mark.parametrize("offset", [0, 1, 65536 - 300, 65536 - 16, 65536 - 1, 65536 + 3])
def test_scan_across_chunk_boundaries(tmp_path: Path, offset: int) -> None:
    # The file's contents start after a ~100-byte NAR header, so these offsets put the
    # hash across the writer's 64 KiB chunk boundary.
    data = bytearray(b"-" * 200_000)
    data[offset : offset + 32] = HASHES[1].encode()
    (tmp_path / "f").write_bytes(data)
    assert scan_for_hashes(tmp_path / "f", HASHES) == {HASHES[1]}


def test_scan_names_targets_and_overlaps(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / f"x{HASHES[0]}y").write_text("")
    (d / "l").symlink_to(f"/nix/store/{HASHES[2]}-foo/bin")
    # a hash embedded in a longer run of nix32 characters is still found
    (d / "f").write_text("aaaa" + HASHES[3] + "zz")
    assert scan_for_hashes(d, HASHES) == {HASHES[0], HASHES[2], HASHES[3]}
    assert scan_for_hashes(d, []) == set()


def test_scan_rejects_bad_hash_parts(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="not a nix32 hash part"):
        scan_for_hashes(tmp_path / "f", ["e" * 32])


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    noise=st.binary(max_size=200),
    prefix=st.text(alphabet="0123456789abcdfghijklmnpqrsvwxyz", max_size=40),
    pos=st.integers(min_value=0, max_value=70_000),
    which=st.sampled_from(HASHES),
)
def test_scan_matches_naive_search(
    tmp_path_factory: pytest.TempPathFactory, noise: bytes, prefix: str, pos: int, which: str
) -> None:
    d = tmp_path_factory.mktemp("scan")
    data = bytearray(b"a" * 70_100)
    data[pos : pos + len(noise)] = noise
    insert = (prefix + which).encode()
    data[pos : pos + len(insert)] = insert
    (d / "f").write_bytes(data)
    nar = b"".join(dump_path(d / "f"))
    expected = {h for h in HASHES if h.encode() in nar}
    assert which in expected
    assert scan_for_hashes(d / "f", HASHES) == expected
