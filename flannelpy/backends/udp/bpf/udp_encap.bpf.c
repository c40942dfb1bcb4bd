// SPDX-License-Identifier: Apache-2.0
/*
 * flannelpy udp backend data plane in tc-BPF, wire-compatible with flanneld's udp proxy:
 * outer IPv4 + UDP (to the peer's PublicIP, port 8285 by default), payload = the bare inner
 * IPv4 packet.  Two programs:
 *
 *   flannel_encap  on flannel0's egress (a TUN: L3, no Ethernet header).  Destination in a
 *                  peer's subnet -> TTL - 1, push outer IPv4/UDP, bpf_redirect_neigh to the
 *                  underlay.  Anything else (unknown destination, not IPv4) goes on to the
 *                  TUN where the Python forwarder answers (ICMP net-unreachable) or drops.
 *   flannel_decap  on the underlay's ingress.  UDP to our address and port from a lease
 *                  holder whose inner source lies in its subnet (or is its PublicIP) ->
 *                  TTL - 1, strip outer headers, redirect into flannel0's ingress.  A spoofed
 *                  inner source or an expiring TTL is dropped; everything else it cannot
 *                  decide (unknown sender, fragments, IP options) goes on to the socket and
 *                  the Python forwarder, which applies the same rules and counts.
 *
 * The agent fills the maps from accepted leases (backends/udp/bpfpath.py).
 * Built by build.sh; the object beside this file is checked against it in CI.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <linux/in.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV4
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#endif

#define ENCAP_LEN (sizeof(struct iphdr) + sizeof(struct udphdr))
/* Not ours to decide: the next tc filter, if any, classifies it; without one it goes on
 * as usual (to the TUN read, or to the stack and the socket).  TC_ACT_OK would end the
 * filter chain and starve another program (or another flannelpy on another port). */
#define PASS TC_ACT_UNSPEC
#define OUTER_TTL 64

struct peer_key {
	__u32 prefixlen;
	__u32 addr; /* network order */
};

struct sender {
	__u32 net;  /* network order */
	__u32 mask; /* network order */
};

struct config {
	__u32 local_ip;    /* network order: our PublicIP, outer source */
	__u32 port;        /* host order */
	__u32 tun_ifindex; /* flannel0 */
	__u32 ext_ifindex; /* the underlay interface */
};

/* Keep in step with bpfpath.STAT_NAMES. */
enum {
	ST_TX_PACKETS,
	ST_TX_BYTES,
	ST_TX_TO_PYTHON,
	ST_TX_EXPIRED,
	ST_TX_ERRORS,
	ST_RX_PACKETS,
	ST_RX_BYTES,
	ST_RX_TO_PYTHON,
	ST_RX_SPOOFED,
	ST_RX_EXPIRED,
	ST_RX_MALFORMED,
	ST_RX_ERRORS,
	ST_MAX,
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__type(key, struct peer_key);
	__type(value, __u32); /* peer PublicIP, network order */
	__uint(map_flags, BPF_F_NO_PREALLOC);
} peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32); /* sender PublicIP, network order */
	__type(value, struct sender);
} senders SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ST_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

static __always_inline void count(__u32 what, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &what);
	if (v)
		*v += n;
}

/* TTL - 1 with the incremental checksum patch (RFC 1624), as flanneld does at both ends.
 * The header's one's-complement sum is unchanged, so skb->csum stays valid. */
static __always_inline int decrement_ttl(struct __sk_buff *skb, __u32 off, struct iphdr *iph)
{
	__u16 old = *(__u16 *)&iph->ttl;
	__u8 ttl = iph->ttl - 1;
	__u16 new;
	if (bpf_skb_store_bytes(skb, off + offsetof(struct iphdr, ttl), &ttl, 1, 0))
		return -1;
	new = old - bpf_htons(0x0100) ; /* ttl is the high byte of the word in network order */
	return bpf_l3_csum_replace(skb, off + offsetof(struct iphdr, check), old, new, 2);
}

/* Inner packets this skb stands for: a GSO skb (forwarded after GRO, or TSO from a local
 * socket) is cut into gso_size pieces later; gso_segs is not always filled in by then. */
static __always_inline __u32 segments(struct __sk_buff *skb, __u32 len)
{
	if (skb->gso_segs > 1)
		return skb->gso_segs;
	if (skb->gso_size)
		return (len + skb->gso_size - 1) / skb->gso_size;
	return 1;
}

static __always_inline __u16 ip_checksum(__u16 *p)
{
	__u32 sum = 0;
#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += p[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
}

SEC("tc")
int flannel_encap(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&config, &zero);
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *iph = data;

	if (!cfg || !cfg->ext_ifindex || skb->protocol != bpf_htons(ETH_P_IP))
		return PASS;
	if ((void *)(iph + 1) > data_end || iph->version != 4 || iph->ihl < 5)
		return PASS;
	struct peer_key key = {.prefixlen = 32, .addr = iph->daddr};
	__u32 *peer = bpf_map_lookup_elem(&peers, &key);
	if (!peer) {
		count(ST_TX_TO_PYTHON, 1); /* no route: Python answers net-unreachable */
		return PASS;
	}
	if (iph->ttl <= 1) {
		count(ST_TX_EXPIRED, 1);
		return TC_ACT_SHOT;
	}
	__u32 peer_ip = *peer;
	__u32 len = skb->len;
	/* The peer must be reached through the underlay we redirect to, as the routing table
	 * says (a multi-homed host may route it elsewhere: then the socket, i.e. Python, sends
	 * it the kernel's way).  Checked before the packet is touched. */
	struct bpf_fib_lookup fib = {
		.family = 2, /* AF_INET */
		.l4_protocol = IPPROTO_UDP,
		.sport = bpf_htons(cfg->port),
		.dport = bpf_htons(cfg->port),
		.ifindex = cfg->ext_ifindex,
		.ipv4_src = cfg->local_ip,
		.ipv4_dst = peer_ip,
	};
	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_SKIP_NEIGH);
	if ((rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH) && fib.ifindex != cfg->ext_ifindex) {
		count(ST_TX_TO_PYTHON, 1);
		return PASS;
	}
	/* bpf_redirect_neigh wants an Ethernet header to pull (it drops an skb whose MAC header
	 * does not precede its network header, as on a TUN): push a placeholder, which the
	 * helper replaces with the neighbour's.  bpf_skb_change_head is meant for exactly this
	 * (an L3 skb going to an L2 device). */
	if (bpf_skb_change_head(skb, sizeof(struct ethhdr), 0)) {
		count(ST_TX_ERRORS, 1);
		return TC_ACT_SHOT;
	}
	if (bpf_skb_adjust_room(skb, ENCAP_LEN, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 |
				BPF_F_ADJ_ROOM_ENCAP_L4_UDP)) {
		count(ST_TX_ERRORS, 1);
		return TC_ACT_SHOT;
	}
	struct {
		struct ethhdr eth;
		struct iphdr ip;
		struct udphdr udp;
	} __attribute__((packed)) h = {};
	__u32 total = len + ENCAP_LEN;
	h.eth.h_dest[0] = 0x02; /* any unicast address: replaced by the neighbour's */
	h.eth.h_proto = bpf_htons(ETH_P_IP);
	h.ip.version = 4;
	h.ip.ihl = 5;
	h.ip.tot_len = bpf_htons(total > 0xffff ? 0xffff : total); /* GSO: fixed per segment */
	h.ip.frag_off = bpf_htons(0x4000); /* DF, like flanneld's socket (PMTU discovery) */
	h.ip.ttl = OUTER_TTL;
	h.ip.protocol = IPPROTO_UDP;
	h.ip.saddr = cfg->local_ip;
	h.ip.daddr = peer_ip;
	h.ip.check = ip_checksum((__u16 *)((char *)&h + sizeof(struct ethhdr)));
	h.udp.source = bpf_htons(cfg->port);
	h.udp.dest = bpf_htons(cfg->port);
	h.udp.len = bpf_htons(len + 8 > 0xffff ? 0xffff : len + 8);
	h.udp.check = 0; /* allowed for IPv4; flanneld accepts it */
	if (bpf_skb_store_bytes(skb, 0, &h, sizeof(h), 0)) {
		count(ST_TX_ERRORS, 1);
		return TC_ACT_SHOT;
	}
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	iph = data + sizeof(h);
	if ((void *)(iph + 1) > data_end) {
		count(ST_TX_ERRORS, 1);
		return TC_ACT_SHOT;
	}
	if (decrement_ttl(skb, sizeof(h), iph)) {
		count(ST_TX_ERRORS, 1);
		return TC_ACT_SHOT;
	}
	count(ST_TX_PACKETS, segments(skb, len));
	count(ST_TX_BYTES, len);
	return bpf_redirect_neigh(cfg->ext_ifindex, NULL, 0, 0);
}

SEC("tc")
int flannel_decap(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&config, &zero);
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *outer = (void *)(eth + 1);
	struct udphdr *udp = (void *)(outer + 1);
	struct iphdr *inner = (void *)(udp + 1);

	if (!cfg || !cfg->tun_ifindex || (void *)(inner + 1) > data_end)
		return PASS;
	if (eth->h_proto != bpf_htons(ETH_P_IP) || outer->version != 4 || outer->ihl != 5 ||
	    outer->protocol != IPPROTO_UDP || outer->daddr != cfg->local_ip)
		return PASS;
	if (udp->dest != bpf_htons(cfg->port))
		return PASS;
	if (outer->frag_off & bpf_htons(0x3fff)) {
		count(ST_RX_TO_PYTHON, 1); /* fragment: the kernel reassembles for the socket */
		return PASS;
	}
	struct sender *s = bpf_map_lookup_elem(&senders, &outer->saddr);
	if (!s) {
		count(ST_RX_TO_PYTHON, 1); /* unknown sender (Python counts and drops it) */
		return PASS;
	}
	if (inner->version != 4 || inner->ihl < 5) {
		count(ST_RX_MALFORMED, 1);
		return TC_ACT_SHOT;
	}
	if ((inner->saddr & s->mask) != s->net && inner->saddr != outer->saddr) {
		count(ST_RX_SPOOFED, 1);
		return TC_ACT_SHOT;
	}
	if (inner->ttl <= 1) {
		count(ST_RX_EXPIRED, 1);
		return TC_ACT_SHOT;
	}
	__u32 segs = segments(skb, skb->len - sizeof(*eth) - ENCAP_LEN);
	/* Strip first: if the kernel refuses, the datagram is untouched and the socket (Python)
	 * takes it.  DECAP_L3_IPV4 (6.3+) also clears the tunnel GSO state the sender's encap
	 * set on a GSO skb that crossed a veth; older kernels reject the flag: retry without. */
	if (bpf_skb_adjust_room(skb, -(__s32)ENCAP_LEN, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV4) &&
	    bpf_skb_adjust_room(skb, -(__s32)ENCAP_LEN, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO)) {
		count(ST_RX_ERRORS, 1);
		return PASS;
	}
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	inner = data + sizeof(struct ethhdr);
	if ((void *)(inner + 1) > data_end || decrement_ttl(skb, sizeof(struct ethhdr), inner)) {
		count(ST_RX_ERRORS, 1);
		return TC_ACT_SHOT;
	}
	count(ST_RX_PACKETS, segs);
	count(ST_RX_BYTES, skb->len - sizeof(*eth));
	return bpf_redirect(cfg->tun_ifindex, BPF_F_INGRESS);
}

char _license[] SEC("license") = "GPL";
