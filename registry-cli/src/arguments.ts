import { closeSync, openSync, readFileSync, readSync } from 'node:fs';
import { normaliseAuthority } from '../../registry/destination.js';
import { AgentGatewayError } from '../../registry/errors.js';
import { hasControlCharacter } from '../../registry/permission.js';
import { formatTimestampMicros, parseTimestampMicros, type CanonicalTimestamp } from '../../registry/timestamp.js';
import { RefusedError, UsageError } from './errors.js';

/** Pure checks of command-line values, shared by the subcommands. */

/** An RFC 3339 option value as canonical text; a malformed one is a usage error. */
export function timestampOption(option: string, value: string | undefined): CanonicalTimestamp | undefined {
  if (value === undefined) return undefined;
  try {
    return formatTimestampMicros(parseTimestampMicros(value));
  } catch (error) {
    throw new UsageError(`${option}: ${(error as Error).message}`, { cause: error });
  }
}

export interface ValidityWindow {
  readonly notBefore: CanonicalTimestamp;
  /** Undefined: no expiry (keys and delegations only). */
  readonly notAfter: CanonicalTimestamp | undefined;
}

/**
 * Refuses a window the gateway could never treat as active: `not_after` not after `not_before`,
 * or already over at `now` (the database's clock).
 */
export function checkValidityWindow(window: ValidityWindow, now: CanonicalTimestamp, what: string): void {
  if (window.notAfter === undefined) return;
  const notBefore = parseTimestampMicros(window.notBefore);
  const notAfter = parseTimestampMicros(window.notAfter);
  if (notAfter <= notBefore) {
    throw new RefusedError('ERR_REFUSED_VALIDITY', `${what}: not_after (${window.notAfter}) must be after not_before (${window.notBefore})`);
  }
  if (notAfter <= parseTimestampMicros(now)) {
    throw new RefusedError('ERR_REFUSED_VALIDITY', `${what}: not_after (${window.notAfter}) is not in the future (database time ${now}); the gateway would treat it as expired`);
  }
}

/**
 * A value that becomes a registry text field (key id, identity): refused when the gateway could
 * never match or verify it. Control characters would make the signed text ambiguous; U+FFFD is
 * what Node makes of an argument's bytes that are not UTF-8, so signing it would store another
 * identity than the one typed.
 */
export function checkTextField(name: string, value: string, maxBytes?: number): string {
  if (value.length === 0) throw new UsageError(`${name} must not be empty`);
  if (hasControlCharacter(value)) throw new RefusedError('ERR_REFUSED_FIELD_INVALID', `${name} ${JSON.stringify(value)} contains a control character; the gateway would deny it`);
  if (/[\ud800-\udfff]/u.test(value)) throw new RefusedError('ERR_REFUSED_FIELD_INVALID', `${name} is not valid Unicode`);
  // Node turns bytes of an argument that are not UTF-8 into U+FFFD: the value is not what was typed.
  if (value.includes('\ufffd')) {
    throw new RefusedError('ERR_REFUSED_FIELD_INVALID', `${name} ${JSON.stringify(value)} contains U+FFFD: the argument was not valid UTF-8 (or holds the replacement character, which no registry text field may)`);
  }
  if (maxBytes !== undefined && Buffer.byteLength(value, 'utf8') > maxBytes) {
    throw new RefusedError('ERR_REFUSED_FIELD_INVALID', `${name} is longer than ${maxBytes} bytes of UTF-8; no certificate could carry it`);
  }
  return value;
}

/** Normalised, de-duplicated destinations in the order given; any malformed one fails them all. */
export function normaliseDestinations(values: readonly string[], options: { required?: boolean } = {}): string[] {
  if (options.required && values.length === 0) throw new UsageError('at least one destination is required');
  const seen = new Set<string>();
  for (const value of values) {
    try {
      seen.add(normaliseAuthority(value));
    } catch (error) {
      if (error instanceof AgentGatewayError) throw error;
      throw new UsageError(`invalid destination ${JSON.stringify(value)}`, { cause: error });
    }
  }
  return [...seen];
}

const DURATION_UNITS_MS: Readonly<Record<string, number>> = { w: 7 * 86_400_000, d: 86_400_000, h: 3_600_000, m: 60_000, s: 1000 };
/** Longer than any permission an operator would sign; keeps the arithmetic far from overflow. */
const MAX_DURATION_MS = 100 * 365 * 86_400_000;

/**
 * A duration such as `30d`, `12h`, `1d12h`, `90m` or `2w` (units w, d, h, m, s, largest first,
 * each at most once) in milliseconds. No bare numbers: `30` could mean seconds or days.
 */
export function durationOption(option: string, value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  const match = /^(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$/.exec(value.trim());
  if (!match || value.trim() === '') throw new UsageError(`${option}: ${JSON.stringify(value)} is not a duration such as 30d, 12h, 1d12h, 90m or 2w (units w, d, h, m, s)`);
  const ms = ['w', 'd', 'h', 'm', 's'].reduce((sum, unit, i) => sum + Number(match[i + 1] ?? 0) * DURATION_UNITS_MS[unit]!, 0);
  if (ms <= 0) throw new UsageError(`${option}: the duration must be longer than zero`);
  if (ms > MAX_DURATION_MS) throw new UsageError(`${option}: the duration must be at most 100 years`);
  return ms;
}

/**
 * The bytes of the file an option names; an unreadable one is a usage error naming the option, the
 * path and why. With `maxBytes`, at most that many are read, however long the file (or device) is:
 * pass one more than you accept to tell a file that is too large.
 */
export function readOptionFile(option: string, path: string, maxBytes?: number): Buffer {
  try {
    if (maxBytes === undefined) return readFileSync(path);
    const fd = openSync(path, 'r');
    try {
      const buffer = Buffer.alloc(maxBytes);
      let length = 0;
      while (length < maxBytes) {
        const read = readSync(fd, buffer, length, maxBytes - length, null);
        if (read === 0) break;
        length += read;
      }
      return buffer.subarray(0, length);
    } finally {
      closeSync(fd);
    }
  } catch (error) {
    throw new UsageError(`cannot read ${option} ${path}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`);
  }
}
