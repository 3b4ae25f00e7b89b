/* sock_lb: ClusterIP load balancing at the socket, for the processes of a
 * cgroup v2 (a node's pods). Attached to the cgroup, not to a netdev:
 *  - connect4 (TCP, and UDP sockets that connect) and sendmsg4 (unconnected
 *    UDP) rewrite a ClusterIP:port to a backend before the kernel routes, so
 *    the packets leave the pod already addressed to the backend and the
 *    per-packet lbrp finds no service in them (it sees a pod address): no
 *    translation, no session, no checksum rewrite per packet;
 *  - recvmsg4 and getpeername4 put the ClusterIP back where the kernel
 *    reports the peer, so the application sees the address it asked for.
 * The per-packet lbrp still serves what never passes these hooks: the node's
 * own stack, processes outside the cgroup (hostNetwork pods), NodePorts and
 * traffic arriving from other nodes.
 *
 * A service without endpoints fails connect() and sendmsg() with
 * ECONNREFUSED, what a client of kube-proxy sees from its REJECT rule (an
 * ICMP port unreachable). Ideas from Cilium's bpf/bpf_sock.c (translation at
 * connect/sendmsg, reverse translation by socket cookie); the code is ours. */
#include "pcn_helpers.h"
#include "pcn_lb.h"
#include "pcn_sock.h"

/* The socket ABI's values (asm-generic): BPF programs get no libc headers. */
#ifndef ECONNREFUSED
#define ECONNREFUSED 111
#endif
#ifndef SOCK_STREAM
#define SOCK_STREAM 1
#define SOCK_DGRAM 2
#endif

/* Allow the system call (the hooks' "1"); 0 with a return value set
 * refuses it with that error (bpf_set_retval, kernel 5.18). */
#define SOCK_ALLOW 1
#define SOCK_DENY 0

/* A user_port as the context holds it: network order in the low 16 bits of
 * a u32 the verifier wants read and written whole. */
static __always_inline int sock_translate(struct bpf_sock_addr *ctx, u8 proto)
{
    if (ctx->user_family != AF_INET)
        return SOCK_ALLOW;
    __be32 ip = ctx->user_ip4;
    __be16 port = (__be16)ctx->user_port;
    int r = pcn_sock_xlate(bpf_get_socket_cookie(ctx), bpf_get_netns_cookie(ctx), proto, &ip,
                           &port);
    if (r == PCN_SOCK_REFUSE) {
        bpf_set_retval(-ECONNREFUSED);
        return SOCK_DENY;
    }
    if (r == PCN_SOCK_XLATED) {
        ctx->user_ip4 = ip;
        ctx->user_port = (u32)port;
    }
    return SOCK_ALLOW;
}

static __always_inline u8 sock_proto(const struct bpf_sock_addr *ctx)
{
    return ctx->type == SOCK_STREAM ? IPPROTO_TCP : IPPROTO_UDP;
}

int sock_connect4(struct bpf_sock_addr *ctx)
{
    u32 type = ctx->type;
    if (type != SOCK_STREAM && type != SOCK_DGRAM)
        return SOCK_ALLOW; /* raw sockets, SCTP's seqpacket: the lbrp's */
    if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
        return SOCK_ALLOW;
    return sock_translate(ctx, sock_proto(ctx));
}

int sock_sendmsg4(struct bpf_sock_addr *ctx)
{
    if (ctx->type != SOCK_DGRAM || ctx->protocol != IPPROTO_UDP)
        return SOCK_ALLOW;
    return sock_translate(ctx, IPPROTO_UDP);
}

/* The peer the kernel reports (recvfrom()'s source, getpeername()) back to
 * the service address; these hooks cannot fail the call: always 1. */
static __always_inline int sock_untranslate(struct bpf_sock_addr *ctx)
{
    if (ctx->user_family != AF_INET)
        return SOCK_ALLOW;
    __be32 ip = ctx->user_ip4;
    __be16 port = (__be16)ctx->user_port;
    if (pcn_sock_rev_lookup(bpf_get_socket_cookie(ctx), &ip, &port)) {
        ctx->user_ip4 = ip;
        ctx->user_port = (u32)port;
    }
    return SOCK_ALLOW;
}

int sock_recvmsg4(struct bpf_sock_addr *ctx)
{
    return sock_untranslate(ctx);
}

int sock_getpeername4(struct bpf_sock_addr *ctx)
{
    return sock_untranslate(ctx);
}
