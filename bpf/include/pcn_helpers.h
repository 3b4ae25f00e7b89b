/* Common includes and build-time knobs shared by every cube.
 *
 * Every cube is compiled by BCC inside the agent. The agent passes
 * -DPCN_PIN_DIR="<bpffs dir of this agent instance>" so that maps shared between
 * cube types (and maps whose state must outlive the agent process) are pinned
 * and found again by the next compile or the next agent.
 */
#ifndef PCN_HELPERS_H
#define PCN_HELPERS_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#ifndef PCN_PIN_DIR
#error "PCN_PIN_DIR must be defined by the agent (-DPCN_PIN_DIR=\"/path\")"
#endif

#define PCN_PIN(name) PCN_PIN_DIR "/" name

#ifndef likely
#define likely(x) __builtin_expect(!!(x), 1)
#endif
#ifndef unlikely
#define unlikely(x) __builtin_expect(!!(x), 0)
#endif

/* Sizes: kept in sync with operator/pcn_agent/dataplane/maps.py (a test checks). */
#define PCN_MAX_PORTS 4096
#define PCN_MAX_CUBES 1024
#define PCN_MAX_SLOTS 256
#define PCN_CHAIN_MAX 8
#define PCN_DROP_REASONS 32

#endif
