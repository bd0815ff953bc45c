"""The aiortc quirks of agent/peer.py, on aiortc's own objects."""

from __future__ import annotations

from aiortc.rtp import RtpPacket

from agent.transports.webrtc_peer import ImmediateAudioJitterBuffer


def packet(seq: int) -> RtpPacket:
    p = RtpPacket(payload_type=111, sequence_number=seq, timestamp=seq * 960)
    p._data = bytes([seq % 256])  # what the receiver sets: the depacketised Opus frame
    return p


def released(buffer: ImmediateAudioJitterBuffer, seq: int) -> int | None:
    _, frame = buffer.add(packet(seq))
    return None if frame is None else frame.timestamp // 960


def test_in_order_frames_leave_at_once() -> None:
    buffer = ImmediateAudioJitterBuffer(capacity=16)
    assert [released(buffer, s) for s in (100, 101, 102)] == [100, 101, 102]


def test_order_is_kept_when_packets_swap() -> None:
    buffer = ImmediateAudioJitterBuffer(capacity=16)
    assert released(buffer, 10) == 10
    assert released(buffer, 12) is None  # 11 is missing: 12 waits in its slot
    assert released(buffer, 11) == 11
    assert released(buffer, 13) == 12  # then it catches up, in order
    assert released(buffer, 9) is None  # older than what was handed on: dropped


def test_sequence_wraps_around() -> None:
    buffer = ImmediateAudioJitterBuffer(capacity=16)
    assert [released(buffer, s) for s in (65534, 65535, 0, 1)] == [65534, 65535, 0, 1]
