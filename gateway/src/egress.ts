import { lookup as dnsLookup } from 'node:dns/promises';
import { isIP } from 'node:net';
import ipaddr from 'ipaddr.js';

/**
 * Egress safety (DESIGN §9c): which addresses a tunnel may reach. Address classes come from
 * ipaddr.js alone: after process() (which unwraps IPv4-mapped IPv6), only what range() calls
 * `unicast` is global. Everything else is refused unless `allow_cidrs` names it: loopback,
 * private, link-local (cloud metadata at 169.254.169.254), CGNAT (100.64/10, Alibaba's metadata),
 * unique-local (fd00:ec2::254), multicast, unspecified, broadcast, reserved and documentation
 * ranges, and the IPv6 embeddings NAT64 (64:ff9b::/96, `rfc6052`), 6to4 and Teredo, whatever
 * they embed. `deny_cidrs` wins over both.
 *
 * IPv6 outside 2000::/3 (IANA's global unicast space) is reserved, whatever ipaddr.js calls it.
 *
 * One class ipaddr.js does not know: IPv4-compatible addresses (::/96 beyond :: and ::1, RFC 4291
 * §2.5.5.1, deprecated). It unwraps them only when written with a dotted tail (`::127.0.0.1`), and
 * calls the hex form a resolver returns (`::7f00:1`) `unicast`; a SIT tunnel routes them to the
 * IPv4 address inside. They are refused like the other embeddings.
 */
export type Cidr = [ipaddr.IPv4 | ipaddr.IPv6, number];

export interface EgressPolicy {
  readonly allow: readonly Cidr[];
  readonly deny: readonly Cidr[];
}

const IPV4_COMPATIBLE: Cidr = [ipaddr.IPv6.parse('::'), 96];
const IPV4_MAPPED: Cidr = [ipaddr.IPv6.parse('::ffff:0:0'), 96];
/** IANA's global unicast space; the rest of IPv6 is reserved by the IETF (RFC 4291 §2.4, the IANA IPv6 Address Space registry). */
const IPV6_GLOBAL_UNICAST: Cidr = [ipaddr.IPv6.parse('2000::'), 3];

/**
 * Parses a CIDR list (config validation has already checked each). Addresses are judged after
 * process() unwraps IPv4-mapped IPv6, so a mapped range (`::ffff:10.0.0.0/104`) is kept as the
 * IPv4 range it names (`10.0.0.0/8`): as written it could never match anything.
 */
export function parseCidrs(list: readonly string[]): Cidr[] {
  return list.map((text) => {
    const [range, bits] = ipaddr.parseCIDR(text);
    if (range.kind() === 'ipv6' && bits >= 96 && (range as ipaddr.IPv6).match(IPV4_MAPPED)) return [(range as ipaddr.IPv6).toIPv4Address(), bits - 96];
    return [range, bits];
  });
}

const CIDR_TEXT = /^([^/]+)\/(?:0|[1-9][0-9]{0,2})$/;

/**
 * True when `text` is a CIDR in one unambiguous spelling (for the config schema): IPv4 as a
 * dotted quad without leading zeros, IPv6 without a zone, a decimal prefix length. ipaddr.js
 * alone also reads `010.0.0.0/8` as 8.0.0.0/8 (octal) and `127.1/32` as 127.0.0.1/32, so a
 * deny range written with a leading zero silently named another network, and a zero-padded
 * balancer address in proxy_protocol_from trusted another host's PROXY header; destinations with
 * such hosts are refused by registry/destination.ts, and ranges now are too.
 */
export function isCidr(text: string): boolean {
  const match = CIDR_TEXT.exec(text);
  if (!match) return false;
  const address = match[1]!;
  if (address.includes('%')) return false;
  const dotted = address.includes(':') ? (address.includes('.') ? address.slice(address.lastIndexOf(':') + 1) : undefined) : address;
  if (dotted !== undefined && !ipaddr.IPv4.isValidFourPartDecimal(dotted)) return false;
  try {
    ipaddr.parseCIDR(text);
    return true;
  } catch {
    return false;
  }
}

export type AddressVerdict = { readonly allowed: true } | { readonly allowed: false; readonly why: string };

/** The first range of `list` holding `address` (ranges of the other family never match). */
export function inList(address: ipaddr.IPv4 | ipaddr.IPv6, list: readonly Cidr[]): Cidr | undefined {
  return list.find(([range, bits]) => range.kind() === address.kind() && address.match(range, bits));
}

/**
 * Verdicts already reached, per policy (a config's is frozen; a reload brings a new one): an
 * agent dials the same few addresses over and over, and ipaddr.js parses and classifies each
 * anew. Bounded: past VERDICTS_KEPT addresses the memo starts again.
 */
const VERDICTS_KEPT = 1024;
const verdicts = new WeakMap<EgressPolicy, Map<string, AddressVerdict>>();

/** The verdict for one address; pure (remembered per policy). */
export function vetAddress(text: string, policy: EgressPolicy): AddressVerdict {
  let known = verdicts.get(policy);
  if (known === undefined) verdicts.set(policy, (known = new Map()));
  let verdict = known.get(text);
  if (verdict === undefined) {
    verdict = judgeAddress(text, policy);
    if (known.size >= VERDICTS_KEPT) known.clear();
    known.set(text, verdict);
  }
  return verdict;
}

function judgeAddress(text: string, policy: EgressPolicy): AddressVerdict {
  let address: ipaddr.IPv4 | ipaddr.IPv6;
  try {
    address = ipaddr.process(text);
  } catch {
    return { allowed: false, why: 'not an IP address' };
  }
  const denied = inList(address, policy.deny);
  if (denied) return { allowed: false, why: `in deny_cidrs ${denied[0].toString()}/${denied[1]}` };
  if (inList(address, policy.allow)) return { allowed: true };
  let range: string = address.range();
  if (range === 'unicast' && address.kind() === 'ipv6') {
    if (address.match(IPV4_COMPATIBLE)) range = 'ipv4Compatible';
    // ipaddr.js calls `unicast` whatever no special range names, 4000::1 and 1::1 too: they are
    // reserved, not global, however a local network might route them.
    else if (!address.match(IPV6_GLOBAL_UNICAST)) range = 'reserved';
  }
  return range === 'unicast' ? { allowed: true } : { allowed: false, why: `${range} address` };
}

export interface ResolvedAddress {
  readonly address: string;
  readonly family: 4 | 6;
}

/** Resolves a hostname to every address it has (tests inject their own). */
export type HostResolver = (host: string) => Promise<ResolvedAddress[]>;

/**
 * One lookup in flight per name, shared by every CONNECT that asks meanwhile; nothing is kept
 * once it settles (each CONNECT still gets an answer no older than its own request). getaddrinfo
 * runs on libuv's threadpool (4 threads) and cannot be cancelled: a name whose DNS never answers
 * holds a thread for the resolver's whole timeout, well past dial_timeout_ms, and CONNECTs to it
 * repeated (or reset and repeated) took every thread, so every other agent's lookup waited
 * behind them and timed out.
 */
export function coalesced(resolver: HostResolver): HostResolver {
  const inFlight = new Map<string, Promise<ResolvedAddress[]>>();
  return (host) => {
    let pending = inFlight.get(host);
    if (pending === undefined) {
      pending = resolver(host).finally(() => inFlight.delete(host));
      inFlight.set(host, pending);
    }
    return pending;
  };
}

export const systemResolver: HostResolver = coalesced(async (host) =>
  (await dnsLookup(host, { all: true, verbatim: true })).map((entry) => Object.freeze({ address: entry.address, family: entry.family === 6 ? 6 : 4 }) as ResolvedAddress),
);

export type VetResult =
  | { readonly ok: true; readonly addresses: readonly ResolvedAddress[] }
  | { readonly ok: false; readonly kind: 'forbidden'; readonly address: string; readonly why: string }
  | { readonly ok: false; readonly kind: 'not_found' | 'timeout'; readonly message: string }
  | { readonly ok: false; readonly kind: 'aborted' };

/**
 * Resolves `host` once (bounded by `timeoutMs` and `signal`) and vets every address: one that is
 * not allowed refuses the destination, so a name that also resolves to an internal address never
 * gets a tunnel. The caller dials exactly the addresses returned, never resolving again.
 */
export async function resolveAndVet(host: string, policy: EgressPolicy, resolver: HostResolver, timeoutMs: number, signal: AbortSignal): Promise<VetResult> {
  return vetLiteral(host, policy) ?? resolveThenVet(host, policy, resolver, timeoutMs, signal);
}

/** The result for an IP-literal host, without resolving; undefined for a name. */
function vetLiteral(host: string, policy: EgressPolicy): VetResult | undefined {
  const family = isIP(host);
  if (family === 0) return undefined;
  return vetAll([{ address: host, family: family === 6 ? 6 : 4 }], policy);
}

async function resolveThenVet(host: string, policy: EgressPolicy, resolver: HostResolver, timeoutMs: number, signal: AbortSignal): Promise<VetResult> {
  let addresses: ResolvedAddress[];
  let timer: NodeJS.Timeout | undefined;
  let onAbort: (() => void) | undefined;
  try {
    addresses = await Promise.race([
      resolver(host),
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(Object.assign(new Error(`no answer within ${timeoutMs} ms`), { code: 'ETIMEOUT' })), timeoutMs);
        onAbort = () => reject(Object.assign(new Error('aborted'), { code: 'ABORT_ERR' }));
        signal.addEventListener('abort', onAbort, { once: true });
      }),
    ]);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === 'ABORT_ERR') return { ok: false, kind: 'aborted' };
    if (code === 'ETIMEOUT') return { ok: false, kind: 'timeout', message: `resolving ${host}: ${(error as Error).message}` };
    return { ok: false, kind: 'not_found', message: `resolving ${host}: ${(error as Error).message}` };
  } finally {
    clearTimeout(timer);
    if (onAbort) signal.removeEventListener('abort', onAbort);
  }
  if (addresses.length === 0) return { ok: false, kind: 'not_found', message: `${host} has no address` };
  return vetAll(addresses, policy);
}

/** Every address must be allowed: one that is not refuses the destination. */
function vetAll(addresses: readonly ResolvedAddress[], policy: EgressPolicy): VetResult {
  for (const { address } of addresses) {
    const verdict = vetAddress(address, policy);
    if (!verdict.allowed) return { ok: false, kind: 'forbidden', address, why: verdict.why };
  }
  return { ok: true, addresses };
}
