"""The pure parts of the cluster: metadata on the wire, the secret file, settings and timeouts, the view."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from khutulun.cluster import ClusterSettings, EventKind, HostMetadata, MemberStatus, suspicion_timeout
from khutulun.cluster.discovery import beacon, read_beacon
from khutulun.cluster.metadata import FORMAT_KEY, MAX_ENCODED, Announcement, decode, encode
from khutulun.cluster.secret import read_secret
from khutulun.cluster.settings import DEFAULT_GROUP, parse_address, parse_group
from khutulun.cluster.view import Member, Observation, Seen, View
from khutulun.errors import InvalidInputError


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now + 1_700_000_000

    def monotonic(self) -> float:
        return self.now


# -- metadata ---------------------------------------------------------------------------------------------------

HOST = HostMetadata(name="web-1", api="http://10.0.0.5:7070", address="10.0.0.5", cpus=2, memory=8 << 30,
                    labels={"zone": "a", "disk": "ssd"}, version="0.1.0", incarnation="3f2a9c1b7d0e")


def test_metadata_is_one_compact_key() -> None:
    raw = encode(Announcement(HOST))
    assert list(raw) == [FORMAT_KEY]
    assert len(raw[FORMAT_KEY]) < 200
    assert json.loads(raw[FORMAT_KEY])["c"] == 2  # "2", not "2.0"
    assert decode(raw) == Announcement(HOST)


def test_defaults_are_left_out_and_flags_come_back() -> None:
    assert encode(Announcement(HostMetadata(name="h")))[FORMAT_KEY] == b'{"n":"h"}'
    drained = HostMetadata(name="h", eligible=False)
    assert decode(encode(Announcement(drained, leaving=True))) == Announcement(drained, leaving=True)


_text = st.text(st.characters(codec="utf-8"), max_size=12)


@given(name=st.text(st.characters(whitelist_categories=("L", "N")), min_size=1, max_size=20),
       cpus=st.floats(0, 512, allow_nan=False), memory=st.integers(0, 1 << 50),
       labels=st.dictionaries(_text.filter(bool), _text, max_size=5), eligible=st.booleans(),
       leaving=st.booleans(), version=_text)
def test_metadata_round_trips(name: str, cpus: float, memory: int, labels: dict[str, str], eligible: bool,
                              leaving: bool, version: str) -> None:
    announcement = Announcement(HostMetadata(name=name, cpus=cpus, memory=memory, labels=labels,
                                             eligible=eligible, version=version), leaving=leaving)
    assert decode(encode(announcement)) == announcement


def test_metadata_too_large_for_a_datagram_is_refused() -> None:
    with pytest.raises(InvalidInputError, match=f"more than the {MAX_ENCODED}"):
        encode(Announcement(HostMetadata(name="h", labels={f"l{i}": "x" * 40 for i in range(30)})))


def test_labels_are_read_only() -> None:
    with pytest.raises(TypeError):
        HOST.labels["zone"] = "b"  # type: ignore[index]


@pytest.mark.parametrize("raw", [b"[1]", b"{", b'{"n":""}', b'{"n":"h","c":true}', b'{"n":"h","l":{"a":1}}',
                                 b"\xff", b'{"n":"h","m":-1}'])
def test_malformed_metadata_is_a_clear_error(raw: bytes) -> None:
    with pytest.raises(InvalidInputError, match="unreadable host metadata"):
        decode({FORMAT_KEY: raw})


def test_metadata_of_another_format_is_none() -> None:
    assert decode({"khutulun/2": b"{}"}) is None
    assert decode({}) is None


# -- the secret -------------------------------------------------------------------------------------------------

def _secret(tmp_path: Path, mode: int, content: bytes = b"0123456789abcdef0123\n") -> Path:
    path = tmp_path / "gossip.key"
    path.write_bytes(content)
    path.chmod(mode)
    return path


def test_the_secret_is_read_without_its_newline(tmp_path: Path) -> None:
    assert read_secret(_secret(tmp_path, 0o600)) == b"0123456789abcdef0123"
    assert read_secret(_secret(tmp_path, 0o400)) == b"0123456789abcdef0123"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o610])
def test_a_secret_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    with pytest.raises(InvalidInputError, match=f"group or others \\(mode 0{mode:o}\\): chmod 600"):
        read_secret(_secret(tmp_path, mode))


def test_a_missing_short_or_strange_secret_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="cannot read the gossip secret file"):
        read_secret(tmp_path / "none")
    with pytest.raises(InvalidInputError, match="has 5 bytes, fewer than 16"):
        read_secret(_secret(tmp_path, 0o600, b"short\n"))
    (tmp_path / "dir").mkdir(mode=0o700)
    with pytest.raises(InvalidInputError, match="not a regular file"):
        read_secret(tmp_path / "dir")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_secret_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = _secret(tmp_path, 0o600)
    os.chown(path, 4242, 4242)
    with pytest.raises(InvalidInputError, match="belongs to uid 4242"):
        read_secret(path)


# -- settings and timeouts --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("10.0.0.5:7000", ("10.0.0.5", 7000)), ("10.0.0.5", ("10.0.0.5", 7946)), ("[::1]:80", ("::1", 80)),
    ("fe80::1", ("fe80::1", 7946)), ("node-1:0", ("node-1", 0)),
])
def test_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["", ":7946", "h:x", "h:70000", "[::1", "[::1]x"])
def test_bad_addresses(text: str) -> None:
    with pytest.raises(InvalidInputError):
        parse_address(text)


def test_settings_are_checked(tmp_path: Path) -> None:
    secret = tmp_path / "s"
    with pytest.raises(InvalidInputError, match="wildcard"):
        ClusterSettings(secret_file=secret, bind="0.0.0.0:7946")
    assert ClusterSettings(secret_file=secret, bind="0.0.0.0:7946", advertise="10.0.0.5:7946")
    with pytest.raises(InvalidInputError, match="ping_timeout"):
        ClusterSettings(secret_file=secret, ping_interval=0.5, ping_timeout=0.5)
    with pytest.raises(InvalidInputError, match="forget_after"):
        ClusterSettings(secret_file=secret, forget_after=0)
    with pytest.raises(InvalidInputError, match="seed address"):
        ClusterSettings(secret_file=secret, seeds=("h:x",))
    fast = ClusterSettings.fast(secret, bind="127.0.0.1:0")
    assert fast.ping_interval < ClusterSettings(secret_file=secret).ping_interval


def test_suspicion_grows_with_log_n(tmp_path: Path) -> None:
    """B6: memberlist's 4 x max(1, log10 N) probe intervals, where swim waits a fixed 5 s."""
    settings = ClusterSettings(secret_file=tmp_path / "s")
    timeouts = [suspicion_timeout(settings, n) for n in (1, 3, 10, 30, 100, 1000)]
    assert timeouts[:3] == [4.0, 4.0, 4.0]
    assert timeouts[3] == pytest.approx(5.91, abs=0.01)
    assert timeouts[4:] == [8.0, 12.0]
    assert suspicion_timeout(ClusterSettings.fast(tmp_path / "s"), 30) == pytest.approx(5.91 / 4, abs=0.01)


# -- the view ---------------------------------------------------------------------------------------------------

def _view(clock: FakeClock) -> View:
    local = Member("10.0.0.1:7946", MemberStatus.ALIVE, HostMetadata(name="me"), clock.time(), local=True)
    return View(clock, local)


def _seen(seen: Seen, *, incarnation: str = "a", leaving: bool = False, **meta: object) -> Observation:
    return Observation("10.0.0.2:7946", seen, HostMetadata(name="web-2", incarnation=incarnation, **meta),  # type: ignore[arg-type]
                       leaving=leaving)


def _kinds(view: View, *observations: Observation) -> list[str]:
    return [event.kind.value for obs in observations for event in view.observe(obs)]


def test_a_member_is_reported_once_its_metadata_is_known() -> None:
    view = _view(FakeClock())
    assert view.observe(Observation("10.0.0.2:7946", Seen.ONLINE, None)) == []
    [event] = view.observe(_seen(Seen.ONLINE))
    assert (event.kind, event.member.name, event.member.status) == (EventKind.JOINED, "web-2", MemberStatus.ALIVE)
    assert [m.name for m in view.members()] == ["me", "web-2"]


def test_suspect_dead_and_back_again() -> None:
    clock = FakeClock()
    view = _view(clock)
    view.observe(_seen(Seen.ONLINE))
    clock.now += 5
    assert _kinds(view, _seen(Seen.SUSPECT), _seen(Seen.SUSPECT), _seen(Seen.ONLINE), _seen(Seen.SUSPECT),
                  _seen(Seen.OFFLINE), _seen(Seen.ONLINE)) == ["suspect", "alive", "suspect", "dead", "alive"]
    member = view.get("10.0.0.2:7946")
    assert member is not None and member.since == clock.time()


def test_a_new_incarnation_joins_again() -> None:
    view = _view(FakeClock())
    assert _kinds(view, _seen(Seen.ONLINE), _seen(Seen.OFFLINE), _seen(Seen.ONLINE, incarnation="b"),
                  _seen(Seen.ONLINE, incarnation="c")) == ["joined", "dead", "joined", "joined"]


def test_left_sticks_until_a_new_incarnation() -> None:
    view = _view(FakeClock())
    assert _kinds(view, _seen(Seen.ONLINE), _seen(Seen.ONLINE, leaving=True), _seen(Seen.SUSPECT, leaving=True),
                  _seen(Seen.OFFLINE, leaving=True), _seen(Seen.OFFLINE), _seen(Seen.ONLINE),
                  _seen(Seen.ONLINE, incarnation="b")) == ["joined", "left", "joined"]


def test_metadata_changes_are_updates() -> None:
    view = _view(FakeClock())
    assert _kinds(view, _seen(Seen.ONLINE), _seen(Seen.ONLINE, cpus=4.0), _seen(Seen.ONLINE, cpus=4.0),
                  _seen(Seen.SUSPECT, cpus=2.0)) == ["joined", "updated", "suspect"]
    member = view.get("10.0.0.2:7946")
    assert member is not None and member.metadata is not None and member.metadata.cpus == 2.0


def test_a_member_first_seen_dead_is_not_reported() -> None:
    view = _view(FakeClock())
    assert _kinds(view, _seen(Seen.OFFLINE), _seen(Seen.ONLINE, leaving=True)) == []
    assert view.get("10.0.0.2:7946") is None


def test_unreadable_metadata_is_reported_without_it() -> None:
    view = _view(FakeClock())
    [event] = view.observe(Observation("10.0.0.2:7946", Seen.ONLINE, None, unreadable=True))
    assert event.member.metadata is None and event.member.name == "10.0.0.2:7946"


def test_dead_and_left_members_expire() -> None:
    """B5: forgotten after forget_after, counted from when they died or left."""
    clock = FakeClock()
    view = _view(clock)
    view.observe(_seen(Seen.ONLINE))
    view.observe(Observation("10.0.0.3:7946", Seen.ONLINE, HostMetadata(name="web-3")))
    clock.now += 100
    view.observe(_seen(Seen.OFFLINE))
    clock.now += 59
    assert view.expired(60) == []
    clock.now += 1
    assert view.expired(60) == ["10.0.0.2:7946"]
    view.remove("10.0.0.2:7946")
    assert [m.name for m in view.members()] == ["me", "web-3"]


def test_a_beacon_is_read_only_with_the_secret_and_while_it_is_fresh() -> None:
    secret = b"0123456789abcdef"
    sent = beacon(secret, "10.0.0.5:7946", 1000.0)
    assert read_beacon(secret, sent, 1010.0) == "10.0.0.5:7946"
    assert read_beacon(b"another secret!!", sent, 1010.0) is None
    assert read_beacon(secret, sent, 1000.0 + 61) is None  # a replay, long after
    assert read_beacon(secret, sent.replace(b"10.0.0.5", b"10.0.0.6"), 1010.0) is None  # tampered
    assert read_beacon(secret, b"short", 1010.0) is None


def test_discovery_groups_are_multicast_addresses(tmp_path: Path) -> None:
    assert parse_group(DEFAULT_GROUP) == ("239.255.70.46", 7947)
    assert parse_group("239.1.2.3") == ("239.1.2.3", 7947)
    for bad in ("10.0.0.1:7947", "239.1.2.3:0", "ff02::1", "multicast:1"):
        with pytest.raises(InvalidInputError, match="discovery group"):
            parse_group(bad)
    secret = _secret(tmp_path, 0o600)
    with pytest.raises(InvalidInputError, match="not a multicast address"):
        ClusterSettings(secret_file=secret, discovery="10.1.1.1:7947")

