/*
 * listen_events.c: TCP sockets entering and leaving LISTEN, for aether's port monitor.
 *
 * Attached to the tracepoint sock:inet_sock_set_state. It reads tracepoint arguments and
 * helpers only, never kernel structs, so headers that do not match the running kernel
 * cannot corrupt a field. Compiled by bcc at load time; AETHER_PERF_BUFFER selects a perf
 * buffer for kernels older than 5.8, which have no BPF ring buffer.
 */

#define AETHER_TCP_LISTEN 10
#define AETHER_TCP_CLOSE 7
#define AETHER_IPPROTO_TCP 6

struct listen_event {
    u64 skaddr;     /* the socket's kernel address: identity while it lives */
    u64 pid_tgid;   /* the task in whose context the state changed */
    u64 ts_ns;      /* bpf_ktime_get_ns(): CLOCK_MONOTONIC, for latency measurement */
    u16 family;
    u16 sport;
    u8 oldstate;
    u8 newstate;
    u8 pad[2];
    u8 saddr[16];   /* IPv4 in the first 4 bytes, or IPv6 */
    char comm[16];  /* the current thread's name: diagnostics only, not the process name */
};

/* Records not delivered (ring full, perf output failed): user space resynchronises when
 * this moves. */
BPF_ARRAY(lost, u64, 1);

#ifdef AETHER_PERF_BUFFER
BPF_PERF_OUTPUT(events);
#else
BPF_RINGBUF_OUTPUT(events, AETHER_RING_PAGES);
#endif

static __always_inline void count_lost(void)
{
    int zero = 0;
    u64 *n = lost.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != AETHER_IPPROTO_TCP)
        return 0;
    /* In: anything -> LISTEN. Out: LISTEN -> CLOSE only. Every accepted connection's child
     * socket is cloned from the listener and goes LISTEN -> SYN_RECV: that is not a close. */
    if (args->newstate != AETHER_TCP_LISTEN &&
        !(args->oldstate == AETHER_TCP_LISTEN && args->newstate == AETHER_TCP_CLOSE))
        return 0;

#ifdef AETHER_PERF_BUFFER
    struct listen_event ev = {};
    struct listen_event *e = &ev;
#else
    struct listen_event *e = events.ringbuf_reserve(sizeof(struct listen_event));
    if (!e) {
        count_lost();
        return 0;
    }
#endif
    e->skaddr = (u64)args->skaddr;
    e->pid_tgid = bpf_get_current_pid_tgid();
    e->ts_ns = bpf_ktime_get_ns();
    e->family = args->family;
    e->sport = args->sport;
    e->oldstate = args->oldstate;
    e->newstate = args->newstate;
    if (args->family == 2 /* AF_INET */) {
        __builtin_memcpy(e->saddr, args->saddr, 4);
        __builtin_memset(e->saddr + 4, 0, 12);
    } else {
        __builtin_memcpy(e->saddr, args->saddr_v6, 16);
    }
    bpf_get_current_comm(e->comm, sizeof(e->comm));
#ifdef AETHER_PERF_BUFFER
    /* Counted here, at once: the kernel's own lost-samples record reaches user space only
     * when that CPU's buffer next has room, which may be never after a burst. */
    if (events.perf_submit(args, e, sizeof(*e)) < 0)
        count_lost();
#else
    events.ringbuf_submit(e, 0);
#endif
    return 0;
}
