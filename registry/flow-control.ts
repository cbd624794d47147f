/**
 * HTTP/2 flow-control windows for the sidecar ⇄ gateway session, shared by both ends.
 *
 * Larger than Node's 64 KiB default, which costs tunnels throughput, but deliberately far below
 * the 16/32 MiB first measured (DESIGN §5b): Node's Http2Session stops reading its socket while
 * one of its own writes is pending. When both peers push more than the TCP buffers between them
 * hold (a full-duplex bulk transfer with 16/32 MiB windows stalls after ~4 MB on loopback), each
 * waits for the other to read and the session deadlocks. Windows that fit in the kernel's socket
 * buffers keep every write completing, so neither side stops reading for long. Measured on this
 * machine (bench/tunnel.ts): 1/2 MiB gives the same single-tunnel throughput as 16/32 MiB.
 */
export const STREAM_WINDOW_BYTES = 1024 * 1024;
export const SESSION_WINDOW_BYTES = 2 * 1024 * 1024;

/**
 * Largest window a config may ask for. Node 22's Http2Session stops reading its socket while one
 * of its own writes is pending: when two Node peers both push more than the kernel's socket
 * buffers hold, each waits for the other to read. Measured on this machine (64 MiB full duplex,
 * agent → sidecar → gateway → echo, test/integration/flow-control.test.ts): Node 22 stalls with
 * 16/32 MiB windows and completes with 4/8 MiB; Node 24 completes at every HTTP/2-legal size,
 * up to 2^31-1. So the bound is the runtime's.
 */
export const MAX_WINDOW_BYTES = Number(process.versions.node.split('.')[0]) >= 24 ? 2 ** 31 - 1 : 8 * 1024 * 1024;

/**
 * nghttp2's per-session memory cap (MB), above Node's 10 MB default so a session carrying
 * hundreds of tunnels is not refused new streams, yet bounded: with the windows above, a peer
 * cannot make one session hold more than a few windows' worth of unread data.
 */
export const MAX_SESSION_MEMORY_MB = 64;

/** The gateway's default `max_streams_per_session`: how many streams a sidecar's session may hold. */
const STREAMS_PER_SESSION = 1000;
/** However large the configured windows, the sidecar's cap stops here. */
const SIDECAR_SESSION_MEMORY_CEILING_MB = 4096;

/**
 * The sidecar's cap (MB). Each open stream may hold up to a stream window of download its agent
 * has not read yet; with MAX_SESSION_MEMORY_MB, a hundred tunnels whose agents stopped reading
 * made Node stop reading the whole session, so every other agent's tunnel stalled until the PING
 * timeout dropped the session (black-box review). The sidecar therefore allows a window for each
 * stream the gateway lets a session open, on top: what is held stays bounded by flow control, and
 * is held for agents behind this sidecar only. The gateway keeps MAX_SESSION_MEMORY_MB: it serves
 * many sidecars, and one session must not hold it a gigabyte.
 */
export function sidecarSessionMemoryMb(streamWindowBytes: number): number {
  return MAX_SESSION_MEMORY_MB + Math.min(SIDECAR_SESSION_MEMORY_CEILING_MB, Math.ceil((STREAMS_PER_SESSION * streamWindowBytes) / 2 ** 20));
}
