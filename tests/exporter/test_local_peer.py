"""The receive queue of a collector on this host, as the exporter reads it (``transport.LocalPeerQueue``)."""
import socket
import time

from exporter.transport import LocalPeerQueue, datagram_truesize


def test_a_bound_collector_shows_its_queue_and_an_absent_one_costs_no_proc_read(tmp_path):
    collector = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    collector.bind(("127.0.0.1", 0))
    port = collector.getsockname()[1]
    peer = LocalPeerQueue("127.0.0.1", port)
    try:
        assert peer.queued() == 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"\0" * 1452, ("127.0.0.1", port))
        deadline = time.monotonic() + 5
        while peer.queued() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert 0 < peer.queued() <= datagram_truesize(1452)
        collector.close()
        # Nobody receives there now. The kernel's lookup says so; the text of /proc/net/udp is not
        # read in its stead (a stand-in that claims a queue for the port must not be believed).
        fake = tmp_path / "udp"
        fake.write_text("  sl  local_address rem_address   st tx_queue rx_queue\n"
                        f"   0: 0100007F:{port:04X} 00000000:0000 07 00000000:00001000 00:00000000 00000000\n")
        peer.path = str(fake)
        assert peer.queued() is None
        assert peer.room(1452, time.monotonic()) is None  # no queue known: ExportRate paces it
    finally:
        collector.close()
        peer.close()
