import { randomBytes } from 'node:crypto';

/**
 * W3C trace context `traceparent`, one parser for the gateway (which logs the trace id) and the
 * sidecar (which continues the agent's trace). Version 00 is exactly 55 characters; a later
 * version may append `-fields` (the spec's forward-compatibility rule); version ff, an all-zero
 * trace id or an all-zero parent id is invalid. Anything invalid is treated as absent.
 */
export interface Traceparent {
  readonly version: string;
  readonly traceId: string;
  readonly parentId: string;
  readonly flags: string;
}

const FORM = /^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$/;
/** Far above any valid header; a peer's megabyte of text is not worth a regular expression. */
const MAX_LENGTH = 512;

export function parseTraceparent(header: string | string[] | undefined): Traceparent | undefined {
  if (typeof header !== 'string' || header.length > MAX_LENGTH) return undefined;
  const m = FORM.exec(header.trim());
  if (!m) return undefined;
  const [, version, traceId, parentId, flags, rest] = m as unknown as [string, string, string, string, string, string | undefined];
  if (version === 'ff' || /^0+$/.test(traceId) || /^0+$/.test(parentId)) return undefined;
  if (version === '00' && rest !== undefined) return undefined;
  return { version, traceId, parentId, flags };
}

/** The trace id of a `traceparent`, or undefined when absent or invalid. */
export function traceIdFromTraceparent(header: string | string[] | undefined): string | undefined {
  return parseTraceparent(header)?.traceId;
}

/**
 * The `traceparent` for a hop that continues `incoming` (same trace id and flags, a fresh parent
 * id for this hop's own span), or starts a new sampled trace when `incoming` is absent or invalid.
 * We speak version 00 whatever version came in, as the spec asks of a participant that knows no
 * later one.
 */
export function childTraceparent(incoming: string | string[] | undefined): string {
  const parent = parseTraceparent(incoming);
  return `00-${parent?.traceId ?? randomBytes(16).toString('hex')}-${randomBytes(8).toString('hex')}-${parent?.flags ?? '01'}`;
}
