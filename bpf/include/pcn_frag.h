/* IPv4 fragments. Only the first fragment of a datagram carries its L4
 * header; the later ones hold nothing but addresses, protocol and the IP
 * identification. A cube that judges or translates by ports must therefore
 * treat every fragment as its datagram's first one was treated: as Cilium
 * does, the first fragment records its ports (and, for a firewall, its
 * verdict) under (addresses, protocol, IP id), and the later ones find them
 * there. Each cube instance keeps its own records (the key holds its id), so
 * one firewall's verdict never leaks into another's, and each records the
 * datagram as it sees it, before its own translation.
 *
 * What cannot be judged is not guessed at:
 *  - a first fragment too short to hold its whole L4 header (RFC 1858 §3.2,
 *    the "tiny fragment"; RFC 3128 shows that anything short of the full
 *    header lets flags be rewritten) is reported by pcn_parse_flow as
 *    PCN_PARSE_SHORT with first_fragment set;
 *  - a later fragment that starts inside that header would overwrite what
 *    the first one was judged by (RFC 1858 §4, overlapping fragments):
 *    pcn_frag_overlaps();
 *  - a later fragment whose first one has not been seen (it comes later, was
 *    lost, or expired) has no ports: pcn_frag_lookup() finds nothing.
 * Where a fragment must be judged or translated, such fragments are dropped
 * and counted (PCN_DROP_FRAGMENT); where it may be no translated datagram's
 * at all (the host's own traffic on the node's NIC) it goes on untouched.
 * Senders emit fragments in order (Linux does), so dropping the out-of-order
 * ones costs a datagram only when the network reorders, where Cilium drops
 * them too; buffering them is no work for tc. The owner's id is reused after
 * the cube is deleted: a new cube may find, for at most the timeout, the
 * records of datagrams its predecessor saw begin.
 *
 * A record is never deleted by the last fragment (fragments may be
 * duplicated or reordered): it ages out of the LRU map, and is ignored once
 * older than the kernel's default reassembly timeout (ipfrag_time, 30 s), by
 * when the IP id may be reused for another datagram. */
#ifndef PCN_FRAG_H
#define PCN_FRAG_H

#include "pcn_helpers.h"
#include "pcn_parse.h"

#define PCN_FRAG_TIMEOUT_NS (30ULL * 1000000000ULL)
#define PCN_FRAG_MAX 16384

struct pcn_frag_key {
    __be32 saddr;
    __be32 daddr;
    __be16 id;
    u8 proto;
    u8 pad;
    u32 owner; /* the cube (instance) id of whoever recorded it */
};

struct pcn_frag_val {
    __be16 sport; /* the first fragment's ports, as this owner saw them */
    __be16 dport;
    u8 icmp_type;
    u8 verdict;   /* a firewall's action for the datagram (0 for other cubes) */
    u16 rule;     /* the firewall rule that decided (for its hit counter) */
    u64 seen_ns;
};

BPF_TABLE_PINNED("lru_hash", struct pcn_frag_key, struct pcn_frag_val, pcn_frags, PCN_FRAG_MAX,
                 PCN_PIN("frags"));

/* A fragment of a datagram (first or later); unfragmented packets are not. */
static __always_inline int pcn_frag_any(const struct pcn_l4info *info)
{
    return info->first_fragment || info->is_fragment;
}

/* A later fragment starting inside the L4 header its first fragment held. */
static __always_inline int pcn_frag_overlaps(const struct pcn_flow *f,
                                             const struct pcn_l4info *info)
{
    return info->is_fragment && info->frag_off < pcn_l4_min_len(f->proto);
}

static __always_inline void pcn_frag_key_of(const struct pcn_flow *f,
                                            const struct pcn_l4info *info, u32 owner,
                                            struct pcn_frag_key *k)
{
    k->saddr = f->saddr;
    k->daddr = f->daddr;
    k->id = info->ip_id;
    k->proto = f->proto;
    k->pad = 0;
    k->owner = owner;
}

/* Record a first fragment: its ports and, for a firewall, what it decided. */
static __always_inline void pcn_frag_record(u32 owner, const struct pcn_flow *f,
                                            const struct pcn_l4info *info, u8 verdict, u16 rule,
                                            u64 now)
{
    struct pcn_frag_key k;
    pcn_frag_key_of(f, info, owner, &k);
    struct pcn_frag_val v = {.sport = f->sport, .dport = f->dport,
                             .icmp_type = info->icmp_type, .verdict = verdict, .rule = rule,
                             .seen_ns = now};
    pcn_frags.update(&k, &v);
}

/* The record of a later fragment's first fragment, or NULL (none, or stale). */
static __always_inline struct pcn_frag_val *pcn_frag_lookup(u32 owner, const struct pcn_flow *f,
                                                           const struct pcn_l4info *info, u64 now)
{
    struct pcn_frag_key k;
    pcn_frag_key_of(f, info, owner, &k);
    struct pcn_frag_val *v = pcn_frags.lookup(&k);
    if (!v || now - v->seen_ns > PCN_FRAG_TIMEOUT_NS)
        return NULL;
    return v;
}

/* For cubes that translate: give every fragment its datagram's ports. A
 * first fragment records them, a later one takes them from that record (its
 * own header, which has none, is the only thing that changes when it is
 * translated: pcn_nat_rewrite leaves L4 alone for it, the L4 checksum being
 * in the first fragment). 0 when `f` now holds the datagram's ports (or the
 * packet is no fragment), -1 for a later fragment that overlaps the header
 * or whose first fragment was not seen. */
static __always_inline int pcn_frag_resolve(u32 owner, struct pcn_flow *f,
                                            struct pcn_l4info *info, u64 now)
{
    if (info->first_fragment) {
        pcn_frag_record(owner, f, info, 0, 0, now);
        return 0;
    }
    if (!info->is_fragment)
        return 0;
    if (pcn_frag_overlaps(f, info))
        return -1;
    struct pcn_frag_val *v = pcn_frag_lookup(owner, f, info, now);
    if (!v)
        return -1;
    f->sport = v->sport;
    f->dport = v->dport;
    info->icmp_type = v->icmp_type;
    return 0;
}

#endif
