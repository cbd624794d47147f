/**
 * The demo's stand-in HTTPS services, `docstore`, `messaging` and a scripted Messages API answering
 * as `api.anthropic.com` (demo/messages-api.ts), with certificates from the mock CA. The gateway reaches them through its `[resolve]` table; agents reach them by name through
 * their sidecar, doing their own TLS, so they verify these certificates against mock-ca.pem.
 *
 *   node --import tsx demo/mock-services.ts --cert certs/mock-services.pem --key certs/mock-services-key.pem \
 *     --docstore-port 9443 --messaging-port 9444 --anthropic-port 9445
 */
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import { createServer, type Server } from 'node:https';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { parseArgs } from 'node:util';
import { messagesApi } from './messages-api.js';

const { values } = parseArgs({
  options: {
    cert: { type: 'string', default: 'certs/mock-services.pem' },
    key: { type: 'string', default: 'certs/mock-services-key.pem' },
    host: { type: 'string', default: '127.0.0.1' },
    'docstore-port': { type: 'string', default: '9443' },
    'messaging-port': { type: 'string', default: '9444' },
    'anthropic-port': { type: 'string', default: '9445' },
  },
});

const documents = [
  { id: 'doc-1', title: 'Quarterly plan', updated: '2026-05-01' },
  { id: 'doc-2', title: 'Design review notes', updated: '2026-05-12' },
];
const messages: { id: number; channel: string; text: string }[] = [{ id: 1, channel: 'general', text: 'welcome to the demo' }];

function json(res: ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { 'content-type': 'application/json' }).end(`${JSON.stringify(body)}\n`);
}

async function readBody(req: IncomingMessage): Promise<string> {
  let body = '';
  for await (const chunk of req) {
    body += chunk;
    if (body.length > 65536) throw new Error('body too large');
  }
  return body;
}

const routes: Record<string, (req: IncomingMessage, res: ServerResponse) => Promise<void> | void> = {
  docstore: (req, res) => {
    if (req.url === '/health') return json(res, 200, { service: 'docstore', status: 'ok' });
    if (req.url === '/documents' && req.method === 'GET') return json(res, 200, { documents });
    const m = /^\/documents\/([\w-]+)$/.exec(req.url ?? '');
    const doc = m && documents.find((d) => d.id === m[1]);
    if (doc) return json(res, 200, doc);
    return json(res, 404, { error: 'not found' });
  },
  messaging: async (req, res) => {
    if (req.url === '/health') return json(res, 200, { service: 'messaging', status: 'ok' });
    if (req.url === '/messages' && req.method === 'GET') return json(res, 200, { messages });
    if (req.url === '/messages' && req.method === 'POST') {
      try {
        const { channel = 'general', text } = JSON.parse(await readBody(req)) as { channel?: string; text?: string };
        if (typeof text !== 'string' || text.length === 0) return json(res, 400, { error: 'text is required' });
        const message = { id: messages.length + 1, channel: String(channel), text };
        messages.push(message);
        return json(res, 201, message);
      } catch {
        return json(res, 400, { error: 'invalid JSON' });
      }
    }
    return json(res, 404, { error: 'not found' });
  },
  anthropic: messagesApi,
};

const tls = { cert: readFileSync(values.cert!), key: readFileSync(values.key!) };
const servers: Server[] = [];
for (const [name, port] of [['docstore', values['docstore-port']], ['messaging', values['messaging-port']], ['anthropic', values['anthropic-port']]] as const) {
  const server = createServer(tls, (req, res) => {
    res.once('finish', () => console.log(JSON.stringify({ event: 'mock_request', service: name, method: req.method, path: req.url, status: res.statusCode })));
    Promise.resolve(routes[name]!(req, res)).catch(() => json(res, 500, { error: 'internal error' }));
  });
  server.listen(Number(port), values.host);
  await once(server, 'listening');
  servers.push(server);
  console.log(JSON.stringify({ event: 'mock_listening', service: name, address: `${values.host}:${port}` }));
}

for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.on(signal, () => {
    for (const server of servers) server.close();
    process.exit(0);
  });
}
