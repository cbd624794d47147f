/**
 * A URL without its secrets, for messages and log lines: the userinfo password and the
 * `password` / `sslpassword` query parameters (libpq reads both) become `redacted`. One function
 * for every program: the gateway's registry errors, the registry CLI's messages and the OTLP
 * endpoint both programs log.
 */
export function redactUrl(url: string): string {
  try {
    const parsed = new URL(url);
    if (parsed.password) parsed.password = 'redacted';
    for (const name of ['password', 'sslpassword']) {
      if (parsed.searchParams.has(name)) parsed.searchParams.set(name, 'redacted');
    }
    return parsed.toString();
  } catch {
    return '[unparseable url]';
  }
}
