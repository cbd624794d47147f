import { Bag, type BagSlot } from './bag.js';
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
  /** authorisationKey() of this tunnel, made once (keyOf). */
  key?: string;
  /** The tracker's bookkeeping: this tunnel's positions in its bags (bag.ts). */
  allSlot?: number;
  keySlot?: number;
  permissionSlot?: number;
}

/** A read-only view of the tunnels under one key or row. */
export interface TunnelGroup extends Iterable<OpenTunnel> {
  readonly size: number;
  any(): OpenTunnel | undefined;
}

const ALL_SLOT: BagSlot<OpenTunnel> = { get: (open) => open.allSlot, set: (open, position) => (open.allSlot = position) };
const KEY_SLOT: BagSlot<OpenTunnel> = { get: (open) => open.keySlot, set: (open, position) => (open.keySlot = position) };
const PERMISSION_SLOT: BagSlot<OpenTunnel> = { get: (open) => open.permissionSlot, set: (open, position) => (open.permissionSlot = position) };

/** The authorisation a tunnel stands on: re-checking one key re-checks all its tunnels. */
export function authorisationKey(identity: string, spkiFingerprint: string, destination: string): string {
  return `${identity}\n${spkiFingerprint}\n${destination}`;
}

/** The authorisation key of an open tunnel, built once: the tracker and the enforcer each need it on open and on close. */
export function keyOf(open: OpenTunnel): string {
  return (open.key ??= authorisationKey(open.identity, open.spkiFingerprint, open.destination));
}

/**
 * Every open tunnel, indexed by what policy changes address: the (identity, key, destination)
 * it was authorised for and the permission row that allowed it. The one place that knows how
 * many tunnels are open: the gauge, /tunnels, shutdown and revocation all read it.
 *
 * Tunnels are kept in bags, not Sets (bag.ts says why); the Maps below gain and lose a key only
 * when its first tunnel opens or its last one closes, and then hold an empty bag.
 */
export class TunnelTracker {
  readonly #all = new Bag<OpenTunnel>(ALL_SLOT);
  readonly #byKey = new Map<string, Bag<OpenTunnel>>();
  readonly #byPermission = new Map<string, Bag<OpenTunnel>>();

  add(open: OpenTunnel): void {
    if (!this.#all.add(open)) return;
    index(this.#byKey, KEY_SLOT, keyOf(open), open);
    index(this.#byPermission, PERMISSION_SLOT, open.permissionId, open);
  }

  delete(open: OpenTunnel): boolean {
    if (!this.#all.delete(open)) return false;
    unindex(this.#byKey, keyOf(open), open);
    unindex(this.#byPermission, open.permissionId, open);
    return true;
  }

  get size(): number {
    return this.#all.size;
  }

  /** The tunnels open at this moment (a tunnel closing during the walk is still visited). */
  [Symbol.iterator](): IterableIterator<OpenTunnel> {
    return this.#all[Symbol.iterator]();
  }

  /** Distinct authorisation keys of open tunnels, each with its tunnels. */
  byAuthorisationKey(): ReadonlyMap<string, TunnelGroup> {
    return this.#byKey;
  }

  byPermission(permissionId: string): TunnelGroup {
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
    let closed = 0;
    for (const open of this.#all) {
      open.tunnel.close(detail);
      closed++;
    }
    return closed;
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

const EMPTY: TunnelGroup = { size: 0, any: () => undefined, [Symbol.iterator]: () => [][Symbol.iterator]() };

function index(map: Map<string, Bag<OpenTunnel>>, slot: BagSlot<OpenTunnel>, key: string, open: OpenTunnel): void {
  let bag = map.get(key);
  if (!bag) map.set(key, (bag = new Bag(slot)));
  bag.add(open);
}

function unindex(map: Map<string, Bag<OpenTunnel>>, key: string, open: OpenTunnel): void {
  const bag = map.get(key);
  if (!bag) return;
  bag.delete(open);
  if (bag.size === 0) map.delete(key);
}
