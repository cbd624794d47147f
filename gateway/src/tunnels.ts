import type { Tunnel, TunnelCloseDetail } from './tunnel.js';

/** One open tunnel as the gateway knows it: who, where, under which row. */
export interface OpenTunnel {
  readonly connectId: string;
  readonly identity: string;
  readonly spkiFingerprint: string;
  /** The client key, for re-checking the tunnel against the registry. */
  readonly spkiDer: Buffer;
  readonly destination: string;
  readonly permissionId: string;
  /** Epoch milliseconds. */
  readonly openedAt: number;
  readonly tunnel: Tunnel;
  /** Bytes already added to the metrics counters (metrics.ts reads and advances these). */
  reportedUp: number;
  reportedDown: number;
}

/** The authorisation a tunnel stands on: re-checking one key re-checks all its tunnels. */
export function authorisationKey(identity: string, spkiFingerprint: string, destination: string): string {
  return `${identity}\n${spkiFingerprint}\n${destination}`;
}

/**
 * Every open tunnel, indexed by what policy changes address: the (identity, key, destination)
 * it was authorised for and the permission row that allowed it. The one place that knows how
 * many tunnels are open: the gauge, /tunnels, shutdown and revocation all read it.
 */
export class TunnelTracker {
  readonly #all = new Set<OpenTunnel>();
  readonly #byKey = new Map<string, Set<OpenTunnel>>();
  readonly #byPermission = new Map<string, Set<OpenTunnel>>();

  add(open: OpenTunnel): void {
    this.#all.add(open);
    index(this.#byKey, authorisationKey(open.identity, open.spkiFingerprint, open.destination), open);
    index(this.#byPermission, open.permissionId, open);
  }

  delete(open: OpenTunnel): boolean {
    if (!this.#all.delete(open)) return false;
    unindex(this.#byKey, authorisationKey(open.identity, open.spkiFingerprint, open.destination), open);
    unindex(this.#byPermission, open.permissionId, open);
    return true;
  }

  get size(): number {
    return this.#all.size;
  }

  [Symbol.iterator](): IterableIterator<OpenTunnel> {
    return this.#all.values();
  }

  /** Distinct authorisation keys of open tunnels, each with its tunnels. */
  byAuthorisationKey(): ReadonlyMap<string, ReadonlySet<OpenTunnel>> {
    return this.#byKey;
  }

  byPermission(permissionId: string): ReadonlySet<OpenTunnel> {
    return this.#byPermission.get(permissionId) ?? EMPTY;
  }

  /**
   * Lets each tunnel notice a stream HTTP/2 closed under it (Tunnel.sweep), and closes tunnels
   * older than `maxLifetimeMs` (0 = no bound). Returns how many reached their lifetime.
   */
  sweep(maxLifetimeMs = 0, now = performance.now(), wallNow = Date.now()): number {
    let expired = 0;
    for (const open of this.#all) {
      if (!open.tunnel.sweep(now)) continue;
      if (maxLifetimeMs > 0 && wallNow - open.openedAt >= maxLifetimeMs && open.tunnel.close('max_lifetime')) expired++;
    }
    return expired;
  }

  /** Closes every open tunnel (shutdown): each ends with END_STREAM, not a reset. */
  closeAll(detail: TunnelCloseDetail): number {
    const all = [...this.#all];
    for (const open of all) open.tunnel.close(detail);
    return all.length;
  }

  /** The admin `GET /tunnels` view (DESIGN §9b). */
  snapshot(): object[] {
    return [...this.#all].map((open) => ({
      connect_id: open.connectId,
      identity: open.identity,
      spki_fingerprint: open.spkiFingerprint,
      destination: open.destination,
      permission_id: open.permissionId,
      opened_at: new Date(open.openedAt).toISOString(),
      bytes_up: open.tunnel.bytesUp,
      bytes_down: open.tunnel.bytesDown,
    }));
  }
}

const EMPTY: ReadonlySet<OpenTunnel> = new Set();

function index(map: Map<string, Set<OpenTunnel>>, key: string, open: OpenTunnel): void {
  let set = map.get(key);
  if (!set) map.set(key, (set = new Set()));
  set.add(open);
}

function unindex(map: Map<string, Set<OpenTunnel>>, key: string, open: OpenTunnel): void {
  const set = map.get(key);
  if (!set) return;
  set.delete(open);
  if (set.size === 0) map.delete(key);
}
