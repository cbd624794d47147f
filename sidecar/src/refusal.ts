import { STATUS_CODES } from 'node:http';
import { agentHint, sidecarResponse, type SidecarReason } from '../../core/errors.js';

/**
 * The one-line text/plain body of every refusal the sidecar hands an agent, whether the gateway
 * refused (its status and `proxy-status` pass through) or the sidecar answered itself:
 *
 *   agent-gateway: CONNECT docstore:443 refused (not_authorized): this agent holds no active permission for it; ask a principal to grant it.
 *
 * What to do comes from the catalogue in core/errors.ts, keyed by the reason code, so the body
 * says nothing the code does not. The destination is the agent's own input, shown sanitised.
 */
export interface Refusal {
  readonly status: number;
  readonly headers: Record<string, string>;
  readonly body: string;
}

/** Name and reason code of an RFC 9209 `proxy-status` value as this product writes it. */
export function readProxyStatus(value: string | undefined): { name: string; details?: string } | undefined {
  const m = value === undefined ? null : /^\s*([A-Za-z0-9_-]{1,64})\s*(?:;|$)/.exec(value);
  if (!m) return undefined;
  const details = /;\s*details="([A-Za-z0-9_]{1,64})"/.exec(value!)?.[1];
  return { name: m[1]!, ...(details !== undefined ? { details } : {}) };
}

/** Printable ASCII only and capped: a request target could hold anything, and the line stays one line. */
function shown(text: string): string {
  const clean = text.replace(/[^\x21-\x7e]/g, '?');
  return clean.length > 200 ? `${clean.slice(0, 200)}...` : clean;
}

/** The refusal for a status and `proxy-status` (the gateway's, or the sidecar's own). */
export function refusal(method: string, target: string, status: number, proxyStatus: string | undefined): Refusal {
  const parsed = readProxyStatus(proxyStatus);
  const name = parsed?.name ?? 'agent-gateway';
  const reason = parsed?.details;
  const hint = reason !== undefined ? agentHint(name, reason) : undefined;
  const why = reason !== undefined ? `(${reason})` : `(status ${status})`;
  const body = `${name}: ${shown(method)} ${shown(target)} refused ${why}: ${hint ?? 'the answer carried no reason code this sidecar knows'}.\n`;
  return {
    status,
    headers: { ...(proxyStatus !== undefined ? { 'proxy-status': proxyStatus } : {}), 'content-type': 'text/plain; charset=utf-8', 'content-length': String(Buffer.byteLength(body)) },
    body,
  };
}

/** A refusal as HTTP/1.1 text, for a socket that speaks no node:http (CONNECT answers, the forwarder). */
export function rawResponse(answer: Refusal): string {
  const lines = [`HTTP/1.1 ${answer.status} ${STATUS_CODES[answer.status] ?? 'Unknown'}`];
  for (const [name, value] of Object.entries({ ...answer.headers, connection: 'close' })) lines.push(`${name}: ${value}`);
  return `${lines.join('\r\n')}\r\n\r\n${answer.body}`;
}

/** The sidecar's own refusal for one of its reasons. */
export function sidecarRefusal(method: string, target: string, reason: SidecarReason): Refusal {
  const response = sidecarResponse(reason);
  return refusal(method, target, response.status, response.headers['proxy-status']);
}
