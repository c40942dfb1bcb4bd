"""/metrics splits the udp backend's traffic by the path that carried it (issue #16): tc-BPF in the kernel or the
Python forwarder.  The totals stay what they were (both paths together, flannel_backend_packets)."""

from prometheus_client.parser import text_string_to_metric_families

from flannelpy.backends.udp.bpfmaps import merged_counters
from flannelpy.ops.metrics import Metrics, path_split

PYTHON = {"tx_packets": 10, "tx_bytes": 1000, "rx_packets": 4, "rx_bytes": 400, "rx_dropped_unknown_source": 2}
BPF = {"bpf_tx_packets": 90, "bpf_tx_bytes": 9000, "bpf_rx_packets": 96, "bpf_rx_bytes": 9600,
       "bpf_rx_dropped_spoofed_source": 1}


def test_path_split_is_the_bpf_part_and_the_rest():
    split = {(m, p, d): v for m, p, d, v in path_split(merged_counters(PYTHON, BPF))}
    assert split[("packets", "bpf", "tx")] == 90 and split[("packets", "python", "tx")] == 10
    assert split[("packets", "bpf", "rx")] == 96 and split[("packets", "python", "rx")] == 4
    assert split[("bytes", "bpf", "rx")] == 9600 and split[("bytes", "python", "rx")] == 400
    # no BPF counters at all (the Python forwarder alone, or another backend): no split is invented
    assert path_split(PYTHON) == []


def test_metrics_show_the_split_beside_the_totals():
    metrics = Metrics()
    metrics.register_counters("udp", lambda: {**merged_counters(PYTHON, BPF), "bpf_active": 1})
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(metrics.render().decode()) for s in fam.samples}
    assert samples[("flannel_backend_packets_total", (("backend", "udp"), ("direction", "tx")))] == 100
    assert samples[("flannel_backend_path_packets_total",
                    (("backend", "udp"), ("direction", "tx"), ("path", "bpf")))] == 90
    assert samples[("flannel_backend_path_packets_total",
                    (("backend", "udp"), ("direction", "tx"), ("path", "python")))] == 10
    assert samples[("flannel_backend_path_bytes_total",
                    (("backend", "udp"), ("direction", "rx"), ("path", "python")))] == 400
    python_only = Metrics()
    python_only.register_counters("udp", lambda: dict(PYTHON))
    assert "flannel_backend_path_" not in python_only.render().decode()
