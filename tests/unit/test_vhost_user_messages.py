"""vhost-user message layouts and decoders (daemon/vhost_user/messages.py)."""

import struct

import pytest
from hypothesis import given, settings, strategies as st

from daemon.vhost_user import messages as m
from daemon.vhost_user.messages import Request, VhostUserError


def region(gpa, size, qva, off=0):
    return m.MEMORY_REGION.pack(gpa, size, qva, off)


def mem_table(*regions, count=None):
    return m.MEMORY_HEADER.pack(len(regions) if count is None else count) + b"".join(regions)


# -- layouts ---------------------------------------------------------------------------

def test_struct_sizes_match_the_c_layouts():
    assert m.HEADER.size == 12
    assert m.VRING_STATE.size == 8
    assert m.VRING_ADDR.size == 40
    assert m.MEMORY_HEADER.size == 8
    assert m.MEMORY_REGION.size == 32


def test_request_ids_match_qemu_7_2():
    assert (Request.GET_FEATURES, Request.SET_MEM_TABLE, Request.GET_VRING_BASE, Request.SET_VRING_CALL,
            Request.GET_QUEUE_NUM, Request.SET_VRING_ENABLE, Request.GET_STATUS) == (1, 5, 11, 13, 17, 18, 40)


# -- golden reply bytes -------------------------------------------------------------------

def test_get_features_reply_bytes():
    assert m.encode_u64_reply(Request.GET_FEATURES, 0x1_5000_0000) == bytes.fromhex(
        "01000000" "05000000" "08000000" "0000005001000000")


def test_get_protocol_features_reply_bytes():
    assert m.encode_u64_reply(Request.GET_PROTOCOL_FEATURES, 0x9) == bytes.fromhex(
        "0f000000" "05000000" "08000000" "0900000000000000")


def test_get_queue_num_reply_bytes():
    assert m.encode_u64_reply(Request.GET_QUEUE_NUM, 9) == bytes.fromhex(
        "11000000" "05000000" "08000000" "0900000000000000")


def test_reply_ack_bytes():
    assert m.encode_u64_reply(Request.SET_MEM_TABLE, 0) == bytes.fromhex(
        "05000000" "05000000" "08000000" "0000000000000000")


def test_get_vring_base_reply_bytes():
    assert m.encode_reply(m.Request.GET_VRING_BASE, m.VRING_STATE.pack(1, 14)) == bytes.fromhex(
        "0b000000" "05000000" "08000000" "01000000" "0e000000")


# -- header ---------------------------------------------------------------------------------

def test_header_decodes_need_reply():
    h = m.decode_header(m.HEADER.pack(5, 0x9, 40))
    assert (h.request, h.size, h.need_reply, h.name) == (5, 40, True, "SET_MEM_TABLE")


def test_header_rejects_wrong_version():
    with pytest.raises(VhostUserError, match="version"):
        m.decode_header(m.HEADER.pack(1, 0x2, 0))


def test_header_rejects_reply_flag_and_unknown_flags():
    with pytest.raises(VhostUserError, match="flags"):
        m.decode_header(m.HEADER.pack(1, 0x5, 0))
    with pytest.raises(VhostUserError, match="flags"):
        m.decode_header(m.HEADER.pack(1, 0x101, 0))


def test_header_rejects_oversized_payload():
    m.decode_header(m.HEADER.pack(99, 1, m.MAX_PAYLOAD))
    with pytest.raises(VhostUserError, match="exceeds"):
        m.decode_header(m.HEADER.pack(99, 1, m.MAX_PAYLOAD + 1))


def test_header_rejects_short_header():
    with pytest.raises(VhostUserError, match="header"):
        m.decode_header(b"\x01\x00\x00\x00\x01")


# -- fixed-size payloads ---------------------------------------------------------------------

@pytest.mark.parametrize("request_id,size", [
    (Request.GET_FEATURES, 0), (Request.SET_FEATURES, 8), (Request.SET_VRING_NUM, 8),
    (Request.SET_VRING_ADDR, 40), (Request.GET_VRING_BASE, 8), (Request.SET_VRING_ENABLE, 8),
    (Request.SET_PROTOCOL_FEATURES, 8), (Request.GET_QUEUE_NUM, 0)])
def test_payload_size_is_exact(request_id, size):
    for wrong in (size - 1, size + 1, size + 8):
        if wrong < 0:
            continue
        with pytest.raises(VhostUserError, match=f"expected {size}"):
            m.decode_payload(request_id, bytes(wrong), 0)


def test_short_payload_is_not_zero_padded():
    # the C virtiofsd takes a short SET_VRING_NUM as complete; we refuse it
    with pytest.raises(VhostUserError, match="4 bytes, expected 8"):
        m.decode_payload(Request.SET_VRING_NUM, struct.pack("<I", 1), 0)


def test_u64_and_state_payloads():
    assert m.decode_payload(Request.SET_FEATURES, m.U64.pack(0x1_5000_0000), 0) == 0x1_5000_0000
    assert m.decode_payload(Request.SET_VRING_BASE, m.VRING_STATE.pack(1, 7), 0) == m.VringState(1, 7)
    assert m.decode_payload(Request.GET_FEATURES, b"", 0) is None


def test_fds_on_a_message_that_takes_none():
    with pytest.raises(VhostUserError, match="unexpected file descriptor"):
        m.decode_payload(Request.SET_FEATURES, m.U64.pack(0), 1)


@pytest.mark.parametrize("num", [0, 3, 100, 65536, 1 << 31])
def test_vring_num_must_be_a_power_of_two_up_to_32768(num):
    with pytest.raises(VhostUserError, match="power of two"):
        m.decode_payload(Request.SET_VRING_NUM, m.VRING_STATE.pack(0, num), 0)


@pytest.mark.parametrize("num", [1, 2, 128, 1024, 32768])
def test_vring_num_accepts_powers_of_two(num):
    assert m.decode_payload(Request.SET_VRING_NUM, m.VRING_STATE.pack(0, num), 0).num == num


def test_vring_index_out_of_range():
    with pytest.raises(VhostUserError, match="index 256"):
        m.decode_payload(Request.SET_VRING_NUM, m.VRING_STATE.pack(256, 128), 0)


def test_vring_base_is_16_bit_and_enable_is_boolean():
    with pytest.raises(VhostUserError, match="16-bit"):
        m.decode_payload(Request.SET_VRING_BASE, m.VRING_STATE.pack(0, 0x10000), 0)
    with pytest.raises(VhostUserError, match="0 or 1"):
        m.decode_payload(Request.SET_VRING_ENABLE, m.VRING_STATE.pack(0, 2), 0)


def test_vring_addr_decodes_field_order():
    # QEMU's struct order is desc, used, avail
    addr = m.decode_payload(Request.SET_VRING_ADDR, m.VRING_ADDR.pack(1, 0, 0x1000, 0x3000, 0x2000, 0x4000), 0)
    assert (addr.index, addr.desc, addr.used, addr.avail, addr.log) == (1, 0x1000, 0x3000, 0x2000, 0x4000)


def test_vring_addr_alignment():
    with pytest.raises(VhostUserError, match="descriptor table .* 16-byte"):
        m.decode_payload(Request.SET_VRING_ADDR, m.VRING_ADDR.pack(0, 0, 0x1008, 0x3000, 0x2000, 0), 0)
    with pytest.raises(VhostUserError, match="used ring .* 4-byte"):
        m.decode_payload(Request.SET_VRING_ADDR, m.VRING_ADDR.pack(0, 0, 0x1000, 0x3002, 0x2000, 0), 0)


# -- kick / call / err ---------------------------------------------------------------------

def test_vring_file_with_and_without_fd():
    assert m.decode_payload(Request.SET_VRING_CALL, m.U64.pack(3), 1) == m.VringFile(3, True)
    assert m.decode_payload(Request.SET_VRING_CALL, m.U64.pack(0x103), 0) == m.VringFile(3, False)


def test_vring_file_fd_count_must_match_nofd_bit():
    with pytest.raises(VhostUserError, match="expected 1"):
        m.decode_payload(Request.SET_VRING_KICK, m.U64.pack(1), 0)
    with pytest.raises(VhostUserError, match="expected 0"):
        m.decode_payload(Request.SET_VRING_CALL, m.U64.pack(0x101), 1)
    with pytest.raises(VhostUserError, match="expected 1"):
        m.decode_payload(Request.SET_VRING_ERR, m.U64.pack(1), 2)


def test_vring_file_unknown_bits():
    with pytest.raises(VhostUserError, match="unknown bits"):
        m.decode_payload(Request.SET_VRING_KICK, m.U64.pack(0x201), 1)


# -- memory table ---------------------------------------------------------------------------

def test_mem_table_as_qemu_sends_it_for_q35_4g():
    payload = mem_table(region(0x0, 0xA0000, 0x7F0000000000, 0),
                        region(0xC0000, 0x7FF40000, 0x7F00000C0000, 0xC0000),
                        region(0x100000000, 0x80000000, 0x7F0080000000, 0x80000000))
    regions = m.decode_payload(Request.SET_MEM_TABLE, payload, 3)
    assert [r.as_tuple() for r in regions] == [
        (0x0, 0xA0000, 0x7F0000000000, 0),
        (0xC0000, 0x7FF40000, 0x7F00000C0000, 0xC0000),
        (0x100000000, 0x80000000, 0x7F0080000000, 0x80000000)]


@pytest.mark.parametrize("count", [0, 9])
def test_mem_table_region_count(count):
    payload = mem_table(*[region(i << 20, 1 << 20, i << 20) for i in range(count)])
    with pytest.raises(VhostUserError, match="regions, expected 1..8"):
        m.decode_payload(Request.SET_MEM_TABLE, payload, count)


def test_mem_table_size_must_match_count():
    payload = mem_table(region(0, 4096, 0), count=2)
    with pytest.raises(VhostUserError, match="expected 72 for 2 regions"):
        m.decode_payload(Request.SET_MEM_TABLE, payload, 2)
    with pytest.raises(VhostUserError, match="too short"):
        m.decode_payload(Request.SET_MEM_TABLE, b"\x01\x00", 1)


@pytest.mark.parametrize("nfds", [0, 2])
def test_mem_table_fd_count_must_match_regions(nfds):
    with pytest.raises(VhostUserError, match=f"1 regions but {nfds} file"):
        m.decode_payload(Request.SET_MEM_TABLE, mem_table(region(0, 4096, 0)), nfds)


def test_mem_table_zero_size_region():
    with pytest.raises(VhostUserError, match="size 0"):
        m.decode_payload(Request.SET_MEM_TABLE, mem_table(region(0, 0, 0)), 1)


@pytest.mark.parametrize("gpa,qva", [((1 << 64) - 4096, 0), (0, (1 << 64) - 4096)])
def test_mem_table_address_overflow(gpa, qva):
    with pytest.raises(VhostUserError, match="wraps"):
        m.decode_payload(Request.SET_MEM_TABLE, mem_table(region(gpa, 8192, qva)), 1)


def test_mem_table_mmap_length_overflow():
    with pytest.raises(VhostUserError, match="mmap_offset"):
        m.decode_payload(Request.SET_MEM_TABLE, mem_table(region(0, 4096, 0, (1 << 63) - 4096)), 1)


def test_mem_table_overlapping_guest_physical():
    payload = mem_table(region(0x10000, 0x10000, 0x100000), region(0x18000, 0x1000, 0x200000))
    with pytest.raises(VhostUserError, match="overlap in guest-physical"):
        m.decode_payload(Request.SET_MEM_TABLE, payload, 2)


def test_mem_table_overlapping_qemu_virtual():
    payload = mem_table(region(0x0, 0x10000, 0x100000), region(0x100000, 0x1000, 0x10F000))
    with pytest.raises(VhostUserError, match="overlap in QEMU virtual"):
        m.decode_payload(Request.SET_MEM_TABLE, payload, 2)


def test_mem_table_adjacent_regions_are_fine():
    payload = mem_table(region(0x0, 0x1000, 0x100000), region(0x1000, 0x1000, 0x101000))
    assert len(m.decode_payload(Request.SET_MEM_TABLE, payload, 2)) == 2


def test_not_decoded_request():
    with pytest.raises(VhostUserError, match="not a message this backend decodes"):
        m.decode_payload(Request.SET_LOG_BASE, bytes(16), 0)
    with pytest.raises(VhostUserError, match="request 200"):
        m.decode_payload(200, b"", 0)


# -- properties: any input gives a value or VhostUserError ----------------------------------

@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=16))
def test_decode_header_raises_only_vhost_user_error(data):
    try:
        h = m.decode_header(data)
    except VhostUserError:
        return
    assert h.size <= m.MAX_PAYLOAD and h.flags & m.VERSION_MASK == 1


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(sorted(m.DECODED) + [0, 6, 99, 1 << 31]),
       st.one_of(st.binary(max_size=300),
                 st.integers(0, 8).flatmap(lambda n: st.binary(min_size=8 + 32 * n, max_size=8 + 32 * n))),
       st.integers(0, 9))
def test_decode_payload_raises_only_vhost_user_error(request_id, payload, nfds):
    try:
        m.decode_payload(request_id, payload, nfds)
    except VhostUserError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1),
                          st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1)),
                min_size=1, max_size=8))
def test_accepted_mem_tables_are_sane(regions):
    payload = mem_table(*[region(*r) for r in regions])
    try:
        decoded = m.decode_payload(Request.SET_MEM_TABLE, payload, len(regions))
    except VhostUserError:
        return
    for r in decoded:
        assert r.size > 0 and r.gpa + r.size <= 1 << 64 and r.qva + r.size <= 1 << 64
    for a in decoded:
        for b in decoded:
            if a is not b:
                assert a.gpa + a.size <= b.gpa or b.gpa + b.size <= a.gpa
                assert a.qva + a.size <= b.qva or b.qva + b.size <= a.qva
