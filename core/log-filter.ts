/**
 * The tracing-style log filter both programs read (the original gateway and sidecar were Rust and
 * used tracing's syntax): `info`, `debug`, `agent_gateway=debug`, or a comma list such as
 * `warn,agent_gateway=info,agent_gateway_sidecar=debug`. Each program names the targets its lines
 * belong to, most specific first; directives for other targets are accepted and filter nothing.
 */
export const LOG_LEVELS = ['trace', 'debug', 'info', 'warn', 'error', 'off'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

/** The gateway's target; the sidecar's lines also answer to it, as their parent in spirit. */
export const GATEWAY_TARGET = /^agent[_-]gateway(?:::[A-Za-z0-9_:]+)?$/;
export const SIDECAR_TARGET = /^agent[_-]gateway[_-]sidecar(?:::[A-Za-z0-9_:]+)?$/;

function asLevel(text: string, directive: string): LogLevel {
  const level = text.trim().toLowerCase();
  if (level === 'warning') return 'warn';
  if (!(LOG_LEVELS as readonly string[]).includes(level)) {
    throw new Error(`unknown level "${text}" in "${directive}" (expected one of ${LOG_LEVELS.join(', ')}, optionally target=level)`);
  }
  return level as LogLevel;
}

/**
 * The level for a process whose lines belong to `targets` (most specific first): the most
 * specific target with a directive wins, then the bare default. Throws with a readable message.
 */
export function levelForTargets(filter: string, targets: readonly RegExp[]): LogLevel {
  const directives = filter.split(',').map((d) => d.trim()).filter(Boolean);
  if (directives.length === 0) throw new Error('must not be empty (e.g. "info" or "agent_gateway=debug")');
  let fallback: LogLevel = 'error';
  const matched: (LogLevel | undefined)[] = targets.map(() => undefined);
  const targetIndex = (name: string) => targets.findIndex((target) => target.test(name));
  for (const directive of directives) {
    const eq = directive.indexOf('=');
    if (eq < 0) {
      // tracing reads a bare target name as "that target at trace"; only ours can matter here, and
      // any other bare word is far more likely a mistyped level, so it is an error.
      const index = targetIndex(directive);
      if (index >= 0) matched[index] = 'trace';
      else fallback = asLevel(directive, directive);
      continue;
    }
    const target = directive.slice(0, eq).trim();
    const level = asLevel(directive.slice(eq + 1), directive);
    if (!/^[A-Za-z_][A-Za-z0-9_:-]*$/.test(target)) throw new Error(`cannot read target "${target}" in "${directive}"`);
    const index = targetIndex(target);
    if (index >= 0) matched[index] = level;
  }
  return matched.find((level) => level !== undefined) ?? fallback;
}
